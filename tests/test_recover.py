"""Recovery: distillation lowers the loss, resumes exactly, and saves what was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import clone, make_model, make_windows, model_output

import rankwise
from rankwise.core.errors import CalibrationError, RankwiseError
from rankwise.core.recipe import Recipe, RecoverConfig
from rankwise.model.layers import LowRankLinear
from rankwise.recovery.checkpoint import Checkpoints
from rankwise.recovery.distill import (
    batch_indices,
    distill_loss,
    learning_rate,
    recover,
    trainable_factors,
)
from rankwise.storage.manifest import Manifest


def compressed_pair(ratio: float = 0.6) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(teacher, student): a tiny llama and its svd-compressed copy."""
    teacher = make_model("llama")
    student = clone(teacher)
    recipe = Recipe(method="svd", ratio=ratio, allocation="uniform")
    rankwise.compress(student, recipe)
    return teacher, student


def config(steps: int = 20, **changes: object) -> RecoverConfig:
    base = dict(steps=steps, lr=3e-3, batch_size=2, dtype="float32", checkpoint_every=5)
    return RecoverConfig(**{**base, **changes})


def mean_kl(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor) -> float:
    return float(distill_loss(model_output(student, ids), model_output(teacher, ids)))


def test_recovery_lowers_the_distillation_loss() -> None:
    teacher, student = compressed_pair()
    windows = make_windows(count=8, seq_len=16)
    before = mean_kl(teacher, student, windows)
    log = recover(student, teacher, windows, config(steps=30))
    after = mean_kl(teacher, student, windows)
    assert after < 0.7 * before
    assert len(log.losses) == 30 and log.tokens == 30 * 2 * 16


def test_only_factors_train_and_the_size_stays() -> None:
    teacher, student = compressed_pair()
    frozen = {n: p.detach().clone() for n, p in student.named_parameters()}
    factor_names = set(trainable_factors(student))
    params_before = sum(p.numel() for p in student.parameters())
    recover(student, teacher, make_windows(count=4, seq_len=16), config(steps=3))
    for name, param in student.named_parameters():
        changed = not torch.equal(param, frozen[name])
        assert changed == (name in factor_names), name
    assert sum(p.numel() for p in student.parameters()) == params_before
    assert all(not p.requires_grad for p in student.parameters())


def test_distill_loss_is_zero_for_equal_logits_and_positive_otherwise() -> None:
    logits = torch.randn(2, 5, 11)
    assert float(distill_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(logits, logits.flip(-1))) > 0


def test_learning_rate_warms_up_then_decays() -> None:
    cfg = RecoverConfig(steps=100, lr=1.0, warmup=0.1, min_lr=0.1)
    rates = [learning_rate(s, cfg) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    assert rates[-1] >= 0.1


def test_batches_cover_every_window_once_per_pass() -> None:
    seen = torch.cat([batch_indices(step, 10, 2, seed=3) for step in range(5)])
    assert sorted(seen.tolist()) == list(range(10))
    assert torch.equal(batch_indices(7, 10, 2, seed=3), batch_indices(7, 10, 2, seed=3))


def test_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    teacher, student = compressed_pair()
    windows = make_windows(count=6, seq_len=16)
    full = clone(student)
    full_log = recover(full, teacher, windows, config(steps=10))

    fingerprint = {"run": "test"}

    def interrupt(step: int, loss: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(
            clone(student),
            teacher,
            windows,
            config(steps=10),
            checkpoints=Checkpoints(tmp_path / "ckpt", fingerprint),
            on_step=interrupt,
        )
    resumed = clone(student)  # a fresh process: the factors as compressed, then the checkpoint
    log = recover(
        resumed,
        teacher,
        windows,
        config(steps=10),
        checkpoints=Checkpoints(tmp_path / "ckpt", fingerprint),
    )
    assert log.start_step == 5
    assert log.losses == pytest.approx(full_log.losses, rel=0, abs=0)
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_from_another_run_is_refused(tmp_path: Path) -> None:
    teacher, student = compressed_pair()
    windows = make_windows(count=4, seq_len=16)
    recover(
        clone(student),
        teacher,
        windows,
        config(steps=6),
        checkpoints=Checkpoints(tmp_path, {"run": "a"}),
    )
    with pytest.raises(RankwiseError, match="different run"):
        recover(
            clone(student),
            teacher,
            windows,
            config(steps=6),
            checkpoints=Checkpoints(tmp_path, {"run": "b"}),
        )


def test_saved_recovered_model_matches_the_trained_one(tmp_path: Path) -> None:
    teacher = make_model("llama")
    student = clone(teacher)
    result = rankwise.compress(student, Recipe(method="svd", ratio=0.5, allocation="uniform"))
    recover(student, teacher, make_windows(count=4, seq_len=16), config(steps=4))
    rankwise.save(result, str(tmp_path / "out"))
    loaded = rankwise.load(tmp_path / "out")
    ids = make_windows(count=2, seq_len=16, seed=9)
    assert torch.allclose(model_output(loaded, ids), model_output(student, ids), atol=1e-5)


def test_bad_inputs_get_named_errors() -> None:
    teacher, student = compressed_pair()
    with pytest.raises(CalibrationError):
        recover(student, teacher, torch.empty(0, 16, dtype=torch.long), config())
    with pytest.raises(RankwiseError, match="no factorized layers"):
        recover(clone(teacher), teacher, make_windows(), config())
    assert any(isinstance(m, LowRankLinear) for m in student.modules())


@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_cli_compress_with_recovery_then_recover_again(method: str, tmp_path: Path) -> None:
    """compress --recover-steps, then `rankwise recover DIR`: both load and carry the log.
    whiten factorizes block by block inside the calibration's inference mode (sequential)."""
    from conftest import word_text, word_tokenizer
    from test_cli import cli

    model = make_model("llama", max_position_embeddings=600)
    model.save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "calib.txt").write_text(word_text(2000, seed=1))
    result = cli(
        "compress", "dense", "--out", "small", "--method", method, "--ratio", "0.5",
        "--allocation", "uniform", "--calib", "calib.txt", "--recover-steps", "3",
        "--recover-lr", "1e-3", "--json", "figures.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    recovery = json.loads((tmp_path / "figures.json").read_text())["compressed"]["recovery"]
    assert recovery["steps"] == 3 and len(recovery["losses"]) == 3
    block = Manifest.read(tmp_path / "small").to_block()
    assert block["recovery"]["steps"] == 3
    assert not list(tmp_path.glob(".small.recover*"))  # checkpoints removed once saved

    result = cli(
        "recover", "small", "--out", "again", "--steps", "4", "--seq-len", "32",
        "--batch-size", "2", "--json", "log.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "log.json").read_text())["losses"]) == 4
    again = rankwise.load(tmp_path / "again", merge_policy="never")
    assert any(isinstance(m, LowRankLinear) for m in again.modules())
    block = Manifest.read(tmp_path / "again").to_block()
    assert block["recovery"]["steps"] == 4 and block["method"] == method


def test_cli_recover_refuses_a_plain_directory(tmp_path: Path) -> None:
    from test_cli import cli, error_lines

    result = cli("recover", str(tmp_path), "--out", "x", cwd=tmp_path)
    assert result.returncode == 2 and len(error_lines(result)) == 1
    assert not (tmp_path / "x").exists()


def test_top_k_kl_with_the_whole_vocabulary_is_the_full_kl() -> None:
    from rankwise.recovery.teacher import top_k_kl, top_k_targets

    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    values, ids = top_k_targets(teacher, 11)
    assert float(top_k_kl(student, values, ids)) == pytest.approx(
        float(distill_loss(student, teacher)), rel=1e-4
    )
    values, ids = top_k_targets(teacher, 3)  # the coarsened KL is never larger
    assert 0 < float(top_k_kl(student, values, ids)) <= float(distill_loss(student, teacher))


def test_recovery_from_cached_teacher_top_k(tmp_path: Path) -> None:
    teacher, student = compressed_pair()
    windows = make_windows(count=8, seq_len=16)
    before = mean_kl(teacher, student, windows)
    loads = []

    def load_teacher() -> torch.nn.Module:
        loads.append(1)
        return teacher

    checkpoints = Checkpoints(tmp_path, {"run": "topk"})
    recover(student, load_teacher, windows, config(steps=30, teacher_topk=32), None, checkpoints)
    assert mean_kl(teacher, student, windows) < 0.7 * before
    assert loads == [1] and (tmp_path / "teacher.safetensors").is_file()


def test_recovery_trains_the_sparse_values_too(tmp_path: Path) -> None:
    from rankwise.model.layers import SparseLowRankLinear

    teacher = make_model("llama")
    student = clone(teacher)
    windows = make_windows(count=8, seq_len=16)
    recipe = Recipe(method="sparse", ratio=0.7, allocation="uniform", sequential=False)
    result = rankwise.compress(student, recipe, windows=windows)
    sparse = [m for m in student.modules() if isinstance(m, SparseLowRankLinear) and m.nnz]
    assert sparse, "the tiny model should get some sparse residuals"
    values_before = [m.values.detach().clone() for m in sparse]
    before = mean_kl(teacher, student, windows)
    recover(student, teacher, windows, config(steps=10, lr=3e-4))
    assert mean_kl(teacher, student, windows) < before
    assert any(not torch.equal(m.values, v) for m, v in zip(sparse, values_before, strict=True))
    rankwise.save(result, str(tmp_path / "out"))
    ids = make_windows(count=2, seq_len=16, seed=9)
    loaded = rankwise.load(tmp_path / "out")
    assert torch.allclose(model_output(loaded, ids), model_output(student, ids), atol=1e-5)
