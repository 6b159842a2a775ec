"""`--method modular`: MLP channel selection (math), narrowed layers through compress, save, load,
generate, the budget, the portable checkpoint plain transformers loads, recovery and truncation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import CAUSAL, FAMILIES, clone, make_model, make_windows, model_output
from torch import nn

import rankwise
from rankwise.allocation.widths import rank_curve, spend, width_curve
from rankwise.cli.recover import run_truncate
from rankwise.core.errors import RankwiseError, RatioError, UnsupportedArchitectureError
from rankwise.core.recipe import Recipe, RecoverConfig
from rankwise.methods import modular
from rankwise.model.accounting import count_parameters
from rankwise.model.layers import LowRankLinear
from rankwise.model.narrow import mlp_groups
from rankwise.model.targets import find_targets
from rankwise.storage.manifest import Manifest

D_FF, OUT = 48, 12


def activations(tokens: int = 400, seed: int = 0) -> torch.Tensor:
    """(tokens, D_FF) float64 SwiGLU-like activations: correlated, of unequal scales."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=gen, dtype=torch.float64)
    mix = torch.randn(16, D_FF, generator=gen, dtype=torch.float64)
    noise = 0.3 * torch.randn(tokens, D_FF, generator=gen, dtype=torch.float64)
    return torch.nn.functional.silu(x @ mix) * torch.linspace(0.2, 2.0, D_FF) + noise


def down_weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(OUT, D_FF, generator=torch.Generator().manual_seed(seed))


def measured_error(z: torch.Tensor, w: torch.Tensor, kept: torch.Tensor, w_kept: torch.Tensor):
    """||Z W^T - Z_S W'^T|| / ||Z W^T|| on the tokens themselves."""
    dense = z @ w.double().T
    return float((dense - z[:, kept] @ w_kept.double().T).norm() / dense.norm())


# --- the math -------------------------------------------------------------------------------


def test_keeping_every_channel_is_exact() -> None:
    z, w = activations(), down_weight()
    chosen = modular.select_channels(z.T @ z, w, D_FF)
    assert torch.equal(chosen.kept, torch.arange(D_FF))
    assert torch.allclose(chosen.down, w, atol=1e-5)
    assert chosen.rel_error < 1e-6


def test_error_does_not_increase_with_width_and_the_curve_is_the_refit_error() -> None:
    z, w = activations(), down_weight()
    gram = z.T @ z
    widths = [1, 4, 12, 24, 36, 47, 48]
    curve = modular.width_curve(gram, w, widths)
    assert all(a >= b - 1e-12 for a, b in zip(curve, curve[1:], strict=False))
    for width, expected in zip(widths, curve, strict=True):
        chosen = modular.select_channels(gram, w, width)
        assert chosen.rel_error == pytest.approx(expected, abs=1e-6)
        assert measured_error(z, w, chosen.kept, chosen.down) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("width", [6, 20, 40])
def test_least_squares_refit_beats_dropping_columns(width: int) -> None:
    z, w = activations(), down_weight()
    chosen = modular.select_channels(z.T @ z, w, width)
    dropped = measured_error(z, w, chosen.kept, w[:, chosen.kept])
    assert chosen.rel_error < dropped


def test_scores_beat_a_random_choice_of_channels() -> None:
    z, w = activations(), down_weight()
    gram = z.T @ z
    chosen = modular.select_channels(gram, w, 12)
    gen = torch.Generator().manual_seed(3)
    randoms = []
    for _ in range(10):
        kept = torch.sort(torch.randperm(D_FF, generator=gen)[:12]).values
        randoms.append(measured_error(z, w, kept, modular.refit_down(gram, w, kept)))
    assert chosen.rel_error < sorted(randoms)[len(randoms) // 2]


def test_a_singular_gram_from_few_tokens_works() -> None:
    z, w = activations(tokens=10), down_weight()  # rank 10 < 48 channels
    chosen = modular.select_channels((z.T @ z).float().double(), w, 10)
    assert torch.isfinite(chosen.down).all()
    assert chosen.rel_error < 1e-2  # 10 independent channels hold 10 tokens' outputs


def test_leverage_is_a_fraction() -> None:
    z = activations()
    leverage = modular.ridge_leverage(z.T @ z)
    assert leverage.shape == (D_FF,) and (leverage >= 0).all() and (leverage < 1).all()


def test_the_budget_goes_where_the_loss_is() -> None:
    flat = torch.full((20,), 1.0)
    steep = torch.cat([torch.full((5,), 100.0), torch.full((15,), 1e-3)])
    curves = [width_curve("a", flat, 10), width_curve("b", steep, 10)]
    steps = spend(curves, budget=15 * 10)
    assert steps["b"] == 5 and steps["a"] == 10
    layer = rank_curve("q", torch.ones(8), 8, 8)
    assert layer.max_steps == 3  # 3 * 16 < 64 <= 4 * 16
    with pytest.raises(RatioError):
        spend(curves, budget=10)


# --- compress, save, load ---------------------------------------------------------------------


def compress(family: str, **recipe: object) -> rankwise.Compressed:
    fields = dict(method="modular", ratio=0.4, importance_samples=2, merge_policy="never")
    return rankwise.compress(
        make_model(family), Recipe(**{**fields, **recipe}), windows=make_windows(8)
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["hybrid", "uniform", "portable"])
def test_compress_save_load_gives_the_same_outputs(family: str, kind: str, tmp_path: Path) -> None:
    options = {"hybrid": {}, "uniform": {"allocation": "uniform"}, "portable": {"portable": True}}
    result = compress(family, **options[kind])
    out = rankwise.save(result, str(tmp_path / "m"))
    loaded = rankwise.load(out)
    ids = make_windows(2, 12, seed=3)
    assert torch.allclose(model_output(result.model, ids), model_output(loaded, ids), atol=1e-5)
    narrowed = [e for e in Manifest.read(out).layers if e.narrowed]
    assert narrowed, "no MLP was narrowed"
    for entry in narrowed:  # plain dense modules of the saved width
        module = loaded.get_submodule(entry.name)
        assert not isinstance(module, LowRankLinear)
        assert module.weight.numel() == entry.count.kept_params
    if family in CAUSAL:
        generated = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
        assert generated.shape == (1, 7)


@pytest.mark.parametrize("kind", [{}, {"allocation": "uniform"}, {"portable": True}])
def test_the_budget_is_met_and_counted_honestly(kind: dict) -> None:
    result = compress("llama", **kind)
    assert 0.4 <= result.targeted_ratio < 0.43
    kept = sum(e.count.kept_params for e in result.layers)
    assert kept == result.targeted_after
    assert result.model_params_after == count_parameters(result.model)
    weights = sum(
        result.model.get_submodule(e.name).weight.numel() for e in result.layers if not e.rank
    )
    factors = sum(e.count.kept_params for e in result.layers if e.rank)
    assert weights + factors == kept


def test_hybrid_spends_the_budget_on_both_kinds() -> None:
    result = compress("llama")
    mlp = [e for e in result.layers if "mlp" in e.name]
    attention = [e for e in result.layers if "self_attn" in e.name]
    assert any(e.narrowed for e in mlp)
    assert all(e.rank is None and not e.narrowed for e in attention) or any(
        e.rank for e in attention
    )
    assert all(e.est_loss is not None for e in attention)


def test_portable_sets_the_config_width_and_leaves_attention_dense() -> None:
    result = compress("llama", portable=True)
    width = result.model.config.intermediate_size
    assert width < 128
    for entry in result.layers:
        if "self_attn" in entry.name:
            assert entry.rank is None and not entry.narrowed
        else:
            assert width in (entry.kept_out, entry.kept_in)


def test_portable_refuses_a_ratio_attention_would_have_to_pay() -> None:
    with pytest.raises(RatioError, match="attention dense"):
        compress("llama", portable=True, ratio=0.9)


def test_portable_needs_modular() -> None:
    with pytest.raises(RankwiseError, match="modular"):
        compress("llama", method="whiten", portable=True)


def test_a_family_without_known_mlp_pairs_is_refused() -> None:
    model = make_model("llama")
    model.config.model_type = "phi3"
    with pytest.raises(UnsupportedArchitectureError, match="phi3"):
        mlp_groups(model, find_targets(model, [r"mlp\.\w+_proj$"]))


PORTABLE_CHILD = textwrap.dedent(
    """
    import importlib.util, sys
    import torch, transformers
    assert importlib.util.find_spec("rankwise") is None, "rankwise is importable"
    directory, ids_file, out_file = sys.argv[1:]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_file)).logits
    torch.save(logits, out_file)
    """
)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_portable_directory_loads_in_plain_transformers(family: str, tmp_path: Path) -> None:
    result = compress(family, portable=True)
    out = rankwise.save(result, str(tmp_path / "m"))
    ids = make_windows(2, 12, seed=4)
    torch.save(ids, tmp_path / "ids.pt")
    # -S: no site processing, so the editable install's .pth never puts src/ on the path; the
    # interpreter's site-packages are given explicitly, and the child checks rankwise is absent
    site = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=site, OMP_NUM_THREADS="1")
    command = [sys.executable, "-S", "-c", PORTABLE_CHILD, out, str(tmp_path / "ids.pt")]
    done = subprocess.run(
        [*command, str(tmp_path / "logits.pt")], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    plain = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(plain, model_output(rankwise.load(out), ids), atol=1e-5)
    saved = json.loads((Path(out) / "config.json").read_text())
    key = "n_inner" if family == "gpt2" else "intermediate_size"
    assert saved[key] == getattr(result.model.config, key) < (512 if family == "gpt2" else 128)


# --- recovery and truncation ------------------------------------------------------------------


def test_hybrid_truncates_its_factors_and_keeps_the_widths(tmp_path: Path) -> None:
    result = compress("llama", ratio=0.3)
    if not any(e.rank for e in result.layers):
        pytest.skip("the allocation left every attention layer dense")
    rankwise.save(result, str(tmp_path / "a"))
    factors = sum(e.count.kept_params for e in result.layers if e.rank)
    ratio = 1 - (result.targeted_after - factors / 2) / result.targeted_before  # factors halved
    info = run_truncate(tmp_path / "a", tmp_path / "b", round(ratio, 3))
    assert round(ratio, 3) <= info["targeted_ratio"] < ratio + 0.02
    cut = rankwise.load(tmp_path / "b")
    before = {e.name: e for e in result.layers if e.narrowed}
    after = {e.name: e for e in Manifest.read(tmp_path / "b").layers if e.narrowed}
    assert before.keys() == after.keys()
    assert all(after[n].count.kept_params == before[n].count.kept_params for n in after)
    assert torch.isfinite(model_output(cut, make_windows(2, 12))).all()


def test_portable_refuses_truncation_clearly(tmp_path: Path) -> None:
    rankwise.save(compress("llama", portable=True), str(tmp_path / "a"))
    with pytest.raises(RatioError, match="no factorized layers"):
        run_truncate(tmp_path / "a", tmp_path / "b", 0.6)


def test_hybrid_recovers_its_factors_and_portable_refuses(tmp_path: Path) -> None:
    teacher = make_model("llama")
    config = RecoverConfig(steps=2, lr=1e-3, batch_size=2, dtype="float32")
    hybrid = rankwise.compress(
        clone(teacher), Recipe(method="modular", ratio=0.4, allocation="uniform"),
        windows=make_windows(8),
    )  # fmt: skip
    widths = {n: m.weight.shape for n, m in hybrid.model.named_modules() if _narrow(n, m)}
    log = rankwise.recover(hybrid.model, teacher, make_windows(4, 16), config)
    assert len(log.losses) == 2
    assert widths == {n: m.weight.shape for n, m in hybrid.model.named_modules() if _narrow(n, m)}
    portable = compress("llama", portable=True)
    with pytest.raises(RankwiseError, match="no factorized layers"):
        rankwise.recover(portable.model, teacher, make_windows(4, 16), config)


def _narrow(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and "mlp" in name
