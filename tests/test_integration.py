"""End to end on the real default model (SmolLM2-135M, cached under ~/.cache/rankwise).

One module-scoped compression (whiten, ratio 0.2, 8 windows of 128 tokens) serves every test;
the CLI test runs its own svd compression (no calibration) in subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise.data import corpora
from rankwise.evaluation import perplexity as evaluate
from rankwise.model.accounting import count_parameters
from rankwise.model.layers import LowRankLinear

pytestmark = pytest.mark.integration

PROMPT = "The government said on Tuesday that"


# One thread, here and in the child processes (conftest sets it for this process). On 2 cores with
# any other load, 2 OpenMP threads made the factorization ~9x slower (svd: 137 s against 16 s).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    loaded = rankwise.load_model("default")
    tokenizer = loaded.tokenizer
    assert tokenizer is not None
    windows = corpora.eval_windows(tokenizer, ("bbc",), seq_len=512, count=2)["bbc"]
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    dense_params = count_parameters(loaded.model)
    dense_ppl = evaluate.perplexity(loaded.model, windows).perplexity

    recipe = rankwise.Recipe(method="whiten", ratio=0.2, samples=8, seq_len=128)
    result = rankwise.compress(loaded.model, recipe, tokenizer=tokenizer)
    out = rankwise.save(result, str(tmp_path_factory.mktemp("whiten") / "model"), tokenizer)
    with torch.no_grad():
        logits = result.model(input_ids=ids).logits
        generated = result.model.generate(ids, max_new_tokens=5, do_sample=False)
    return {
        "result": result,
        "out": Path(out),
        "tokenizer": tokenizer,
        "windows": windows,
        "ids": ids,
        "logits": logits,
        "generated": generated,
        "dense_params": dense_params,
        "dense_ppl": dense_ppl,
    }


def test_accounting(run: dict) -> None:
    result = run["result"]
    assert 0.2 - 1e-9 <= result.targeted_ratio < 0.25  # exactly 0.2 can round to 0.1999...
    assert 0.0 < result.model_ratio < result.targeted_ratio
    assert result.model_params_before == run["dense_params"]
    assert count_parameters(result.model) == result.model_params_after
    assert len(result.layers) == 30 * 7  # 30 blocks of q, k, v, o, gate, up, down
    assert all(0.0 < layer.rel_error < 1.0 for layer in result.layers if layer.rank)


def test_saved_model_loads_in_a_separate_process(run: dict, tmp_path: Path) -> None:
    expected = tmp_path / "expected.pt"
    torch.save(
        {
            "ids": run["ids"],
            "logits": run["logits"],
            "generated": run["generated"],
            "params": torch.tensor(run["result"].model_params_after),
        },
        expected,
    )
    script = textwrap.dedent(
        f"""
        import torch
        import rankwise
        from rankwise.model.accounting import count_parameters
        from rankwise.model.layers import LowRankLinear

        expected = torch.load({str(expected)!r}, weights_only=True)
        model = rankwise.load({str(run["out"])!r}, merge_policy="never")
        assert any(isinstance(m, LowRankLinear) for m in model.modules())
        assert count_parameters(model) == int(expected["params"]), count_parameters(model)
        with torch.no_grad():
            logits = model(input_ids=expected["ids"]).logits
            generated = model.generate(expected["ids"], max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-4)
        assert generated.shape[1] == expected["ids"].shape[1] + 5, generated.shape
        assert torch.equal(generated, expected["generated"]), (generated, expected["generated"])
        print("child ok")
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script], env=CHILD_ENV, capture_output=True, text=True, timeout=180
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert "child ok" in child.stdout


def test_loaded_model_generates_text(run: dict) -> None:
    loaded = rankwise.load_model(str(run["out"]))
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = run["ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    assert torch.equal(generated[:, : ids.shape[1]], ids)
    text = tokenizer.decode(generated[0, ids.shape[1] :])
    assert text.strip()


def test_perplexity_is_finite_and_above_dense(run: dict) -> None:
    compressed = evaluate.perplexity(run["result"].model, run["windows"])
    assert compressed.windows == 2 and compressed.tokens == 2 * 511
    assert math.isfinite(compressed.perplexity)
    assert run["dense_ppl"] < compressed.perplexity < 50 * run["dense_ppl"]


def test_cli_compress_and_eval(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "rankwise", *args],
            cwd=tmp_path,
            env=CHILD_ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )

    made = cli("compress", "default", "--method", "svd", "--ratio", "0.2",
               "--allocation", "uniform", "--out", "D")  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    assert (tmp_path / "D" / "config.json").is_file()
    assert (tmp_path / "D" / "tokenizer.json").is_file()
    model = rankwise.load(tmp_path / "D", merge_policy="never")
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 30 * 7

    evaluated = cli("eval", "D", "--windows", "1", "--streams", "bbc", "--json", "F")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    row = json.loads((tmp_path / "F").read_text())
    assert math.isfinite(row["perplexity"]["bbc"]) and row["perplexity"]["bbc"] > 1.0
    assert row["params"] == count_parameters(model)
    assert 0.2 <= row["targeted_ratio"] < 0.25


def test_importance_allocation_beats_uniform_on_the_real_model(tmp_path: Path) -> None:
    """Same statistics, same budget (0.4 of the targets removed): spending it by importance
    gives a lower held-out perplexity than removing 40% of every matrix."""
    stats = str(tmp_path / "stats.safetensors")
    base = dict(method="whiten", ratio=0.4, samples=8, seq_len=256, stats=stats)
    perplexity = {}
    for allocation in ("uniform", "importance"):
        loaded = rankwise.load_model("default")
        windows = corpora.eval_windows(loaded.tokenizer, ("bbc",), seq_len=512, count=2)["bbc"]
        recipe = rankwise.Recipe(**base, allocation=allocation, importance_samples=4)
        result = rankwise.compress(loaded.model, recipe, tokenizer=loaded.tokenizer)
        assert 0.4 <= result.targeted_ratio <= 0.403
        perplexity[allocation] = evaluate.perplexity(result.model, windows).perplexity
    assert perplexity["importance"] < 0.9 * perplexity["uniform"], perplexity


def test_recovery_moves_the_real_model_toward_the_teacher(run: dict) -> None:
    """A few distillation steps on calibration text lower the KL to the dense model on
    held-out text (the saved whiten 0.2 model as the student)."""
    from rankwise.recovery.distill import distill_loss

    teacher = rankwise.load_model("default").model
    student = rankwise.load_model(str(run["out"])).model  # as stored: factorized
    train = corpora.calibration_windows(run["tokenizer"], "bbc", 8, 128)
    held_out = run["windows"][:, :256]

    def kl() -> float:
        with torch.no_grad():
            return float(distill_loss(student(held_out).logits, teacher(held_out).logits))

    before = kl()
    config = rankwise.RecoverConfig(steps=8, lr=5e-5, batch_size=2, seq_len=128, warmup=0.25)
    log = rankwise.recover(student, teacher, train, config)
    assert len(log.losses) == 8 and all(math.isfinite(x) for x in log.losses)
    assert kl() < 0.95 * before


def test_lm_eval_hflm_takes_the_loaded_model(run: dict) -> None:
    """lm-eval's HFLM on the model `rankwise.load` returns, on rankwise's offline task."""
    pytest.importorskip("lm_eval")
    from rankwise.evaluation.harness import run_tasks

    loaded = rankwise.load_model(str(run["out"]))
    results = run_tasks(
        loaded.model, loaded.tokenizer, ["rt_sentiment"], limit=10, bootstrap_iters=0
    )
    assert 0.0 <= results.metrics()["rt_sentiment"]["acc"] <= 1.0


def test_features_of_the_real_model_read_as_text_and_survive_compression(run: dict) -> None:
    """Semi-NMF of a late MLP on held-out BBC text: features read as tokens in context, and
    the whiten 0.2 model keeps most of each (correlation of coefficients)."""
    from rankwise.analysis.features import FeatureOptions, analyse

    dense = rankwise.load_model("default").model
    options = FeatureOptions(layer=27, features=8)
    figures = analyse(dense, run["tokenizer"], run["windows"], options, other=run["result"].model)
    assert figures["module"] == "model.layers.27.mlp.down_proj" and figures["width"] == 1536
    assert figures["tokens"] == 1024 and figures["neurons_per_feature"] == 154
    assert figures["svd_relative_error"] <= figures["relative_error"] < 1.0
    contexts = [c for r in figures["records"] for c in r["contexts"]]
    assert all("[[" in c and c.endswith("]]") for c in contexts)
    assert sum(any(ch.isalpha() for ch in c) for c in contexts) > len(contexts) / 2
    kept = sorted(r["kept"] for r in figures["records"])
    assert 0.5 < kept[len(kept) // 2] <= 1.0, kept
    assert 0.0 < figures["activation_change"] < 1.0
