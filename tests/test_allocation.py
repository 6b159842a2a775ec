"""Importance allocation: budget accounting, bounds, sensitivity, determinism."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_windows, spy_compressed

import rankwise
from rankwise.allocation.budget import allocate_importance, targeted_params
from rankwise.calibration.statistics import Statistics
from rankwise.core.errors import RatioError
from rankwise.core.recipe import LayerOverride, Recipe
from rankwise.model.accounting import LayerShape
from rankwise.model.layers import LowRankLinear

# Large enough that one rank step is well under 0.5% of the budget.
SHAPES = [
    LayerShape("a", 512, 512),
    LayerShape("b", 1024, 512),
    LayerShape("c", 512, 1024),
    LayerShape("d", 256, 512),
]


def flat_gains(shape: LayerShape, scale: float = 1.0) -> torch.Tensor:
    """A slowly decaying spectrum (squared): every layer worth about the same per component."""
    k = min(shape.out_features, shape.in_features)
    return scale * torch.linspace(1.0, 0.1, k, dtype=torch.float64)


def achieved(shapes: list[LayerShape], ranks: dict[str, int | None]) -> float:
    dense, kept = targeted_params(shapes, ranks)
    return 1 - kept / dense


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6, 0.8])
def test_budget_is_honoured(ratio: float) -> None:
    gains = {s.name: flat_gains(s) for s in SHAPES}
    ranks = allocate_importance(SHAPES, gains, ratio)
    assert ratio <= achieved(SHAPES, ranks) <= ratio + 0.005
    assert all(r is None or r >= 1 for r in ranks.values())


def test_layer_that_cannot_save_parameters_stays_dense_and_is_counted() -> None:
    shapes = [*SHAPES, LayerShape("tiny", 2, 1)]  # rank 1 costs 3 > 2: never factorized
    gains = {s.name: flat_gains(s) for s in shapes}
    ranks = allocate_importance(shapes, gains, 0.4)
    assert ranks["tiny"] is None
    assert 0.4 <= achieved(shapes, ranks) <= 0.405


def test_layer_with_larger_gains_gets_more_rank() -> None:
    gains = {s.name: flat_gains(s) for s in SHAPES}
    gains["b"] = flat_gains(SHAPES[1], scale=5.0)
    ranks = allocate_importance(SHAPES, gains, 0.5)
    even = allocate_importance(SHAPES, {s.name: flat_gains(s) for s in SHAPES}, 0.5)
    assert ranks["b"] is None or ranks["b"] > even["b"]


def test_layer_with_negligible_gains_drops_to_rank_one() -> None:
    gains = {s.name: flat_gains(s) for s in SHAPES}
    gains["a"] = flat_gains(SHAPES[0], scale=1e-9)
    assert allocate_importance(SHAPES, gains, 0.4)["a"] == 1


def test_overwhelming_layer_is_kept_dense_at_a_low_ratio() -> None:
    gains = {s.name: flat_gains(s) for s in SHAPES}
    gains["c"] = flat_gains(SHAPES[2], scale=1e6)
    assert allocate_importance(SHAPES, gains, 0.2)["c"] is None


def test_overrides_dense_ratio_and_keep_bounds() -> None:
    gains = {s.name: flat_gains(s) for s in SHAPES}
    gains["a"] = flat_gains(SHAPES[0], scale=1e-9)  # would get rank 1 on its own
    overrides = [
        LayerOverride(pattern="^a$", min_keep=0.5),
        LayerOverride(pattern="^b$", dense=True),
        LayerOverride(pattern="^c$", ratio=0.9),
        LayerOverride(pattern="^d$", max_keep=0.3),
    ]
    ranks = allocate_importance(SHAPES, gains, 0.5, overrides)
    assert ranks["a"] * 1024 >= 0.5 * 512 * 512
    assert ranks["b"] is None
    assert ranks["c"] == int(0.1 * 512 * 1024 / 1536)
    assert ranks["d"] * 768 <= 0.3 * 256 * 512
    assert 0.5 <= achieved(SHAPES, ranks) <= 0.505


def test_impossible_budget_is_a_ratio_error() -> None:
    gains = {s.name: flat_gains(s) for s in SHAPES}
    with pytest.raises(RatioError):
        allocate_importance(SHAPES, gains, 0.5, [LayerOverride(pattern=".", min_keep=0.9)])


def test_allocation_is_deterministic_with_ties() -> None:
    gains = {s.name: torch.ones(min(s.out_features, s.in_features)) for s in SHAPES}
    first = allocate_importance(SHAPES, gains, 0.4)
    assert all(allocate_importance(SHAPES, gains, 0.4) == first for _ in range(3))


def importance_run(model: torch.nn.Module, ratio: float = 0.5, **recipe: object):
    recipe = {"calib_dtype": "float32", "allocation": "importance", "ratio": ratio, **recipe}
    return rankwise.compress(model, Recipe(**recipe), windows=make_windows(8, 16))


@pytest.mark.parametrize("sequential", [True, False])
def test_importance_compress_meets_the_budget(sequential: bool) -> None:
    result = importance_run(make_model("llama"), sequential=sequential)
    assert 0.5 <= result.targeted_ratio <= 0.505
    assert all(layer.est_loss is not None for layer in result.layers)


@pytest.mark.parametrize("sequential", [True, False])
def test_second_round_weighs_layers_by_the_compressed_models_fisher(
    sequential: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2 measures the output Fisher on the model round 1 compressed (factors in place),
    re-allocates, and compresses again from the dense weights, within the same budget."""
    import rankwise.allocation.estimate as estimate

    seen = spy_compressed(monkeypatch, estimate.statistics, "collect_output_fisher")
    model = make_model("llama")
    result = importance_run(model, importance_rounds=2, sequential=sequential)
    assert seen[-1] is True  # the last Fisher was measured on a compressed model
    assert 0.5 <= result.targeted_ratio <= 0.505
    for name, rank in result.ranks.items():  # the dense layers of round 1 were replaced again
        module = result.model.get_submodule(name)
        assert (rank is None) == (not isinstance(module, LowRankLinear))
        assert rank is None or module.rank == rank
    with torch.no_grad():
        assert torch.isfinite(result.model(make_windows(2, 16)).logits).all()


def test_importance_compress_is_deterministic() -> None:
    first = importance_run(make_model("llama")).ranks
    assert importance_run(make_model("llama")).ranks == first


def test_a_rescaling_that_keeps_the_function_keeps_the_allocation() -> None:
    """v_proj / 100 and o_proj x 100 compute the same model. v_proj's spectrum shrinks 100x, but
    the loss feels its output errors 100x more: the estimated loss, hence its rank, must not
    change. (Raw output error alone would starve v_proj.)"""
    plain = make_model("llama")
    scaled = make_model("llama")
    attention = scaled.model.layers[1].self_attn
    with torch.no_grad():
        attention.v_proj.weight /= 100
        attention.o_proj.weight *= 100
    name = "model.layers.1.self_attn.v_proj"
    assert importance_run(scaled).ranks[name] == importance_run(plain).ranks[name]


def test_a_block_that_feeds_the_output_harder_gets_more_rank() -> None:
    """Scaling block 1's MLP output makes it dominate the residual stream: it matters more."""
    plain, loud = make_model("llama"), make_model("llama")
    with torch.no_grad():
        loud.model.layers[1].mlp.down_proj.weight *= 20
    name = "model.layers.1.mlp.down_proj"
    loud_rank = importance_run(loud).ranks[name]
    assert loud_rank is None or loud_rank > importance_run(plain).ranks[name]


def test_encoder_without_a_loss_falls_back_to_uniform() -> None:
    result = importance_run(make_model("bert"), ratio=0.4)
    assert result.recipe.allocation == "uniform"
    assert 0.4 <= result.targeted_ratio <= 0.45


@pytest.mark.parametrize("estimator", ["output_error", "relative"])
def test_simpler_estimators_need_no_backward_pass(estimator: str) -> None:
    result = importance_run(make_model("bert"), ratio=0.4, importance_estimator=estimator)
    assert result.recipe.allocation == "importance"
    assert all(layer.est_loss is not None for layer in result.layers)


def test_statistics_file_is_completed_with_output_fisher(tmp_path) -> None:
    """A stats file from a uniform run lacks output_fisher: the importance run adds it, keeps
    the grams, and a rerun from the file gives the same ranks."""
    path = tmp_path / "stats.safetensors"
    importance_run(make_model("llama"), allocation="uniform", stats=str(path))
    first = importance_run(make_model("llama"), stats=str(path))
    layers = Statistics.load(path).layers.values()
    assert all(s.output_fisher is not None and s.input_gram is not None for s in layers)
    assert importance_run(make_model("llama"), stats=str(path)).ranks == first.ranks
