"""Measured importance: the loss of truncating one layer alone, and curves rescaled to it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model, make_windows, spy_compressed

import rankwise
from rankwise.allocation.sensitivity import TailLoss, calibrated_gains, single_layer_losses
from rankwise.calibration.run import CalibrationRun
from rankwise.core.progress import Reporter, Timer
from rankwise.core.recipe import Recipe
from rankwise.methods import MethodOptions, get_method
from rankwise.model.accounting import LayerShape
from rankwise.model.layers import factored_layer
from rankwise.model.modules import linear_weight, set_module
from rankwise.model.targets import find_targets


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_tail_loss_is_the_models_own_loss(family: str) -> None:
    model = make_model(family)
    ids = make_windows(3, 16)
    tail = TailLoss(model, find_targets(model), ids, torch.float32)
    with torch.no_grad():
        expected = float(model(input_ids=ids, labels=ids).loss)
    assert tail.base == pytest.approx(expected, rel=1e-5)
    assert tail.loss_from(1) == pytest.approx(expected, rel=1e-5)  # from a later block: same


@pytest.mark.parametrize("method", ["whiten", "sparse"])
def test_single_layer_loss_is_measured_with_that_layer_alone_truncated(method: str) -> None:
    model = make_model("llama")
    names = find_targets(model)
    windows, loss_ids = make_windows(8, 16), make_windows(2, 16, seed=1)
    name = "model.layers.1.mlp.down_proj"
    ranks = {n: 4 for n in names}

    recipe = Recipe(method=method, calib_dtype="float32", importance_samples=8, measure_samples=2)
    shapes = {n: LayerShape(n, *linear_weight(model.get_submodule(n)).shape) for n in names}
    both = torch.cat([windows, loss_ids])  # importance windows first, then the measured ones
    args = (model, names, shapes, get_method(method), recipe, None, both, Reporter(), Timer())
    run = CalibrationRun(*args)

    def measure(**known: set[int]) -> dict[str, tuple[int, float]]:
        return single_layer_losses(run, ranks, known=known)

    found = measure()
    assert set(found) == set(names) and all(rank == 4 for rank, _ in found.values())
    # the same truncation by hand: the method's factors of the dense grams, others dense
    stats = rankwise.calibration.statistics.collect(
        model, names, windows, frozenset({"input_gram"})
    )
    factors = get_method(method).factorize(
        linear_weight(model.get_submodule(name)), stats.layers[name], 4, MethodOptions()
    )
    trial = copy.deepcopy(model)
    layer = factored_layer(factors.left, factors.right, factors.sparse, None)
    set_module(trial, name, layer)
    with torch.no_grad():
        dense = float(model(input_ids=loss_ids, labels=loss_ids).loss)
        truncated = float(trial(input_ids=loss_ids, labels=loss_ids).loss)
    assert found[name][1] == pytest.approx(truncated - dense, rel=1e-3, abs=1e-6)
    again = measure(**{name: {4}})
    assert set(again) == set(names) - {name}  # measured before at that rank: not again


def test_curves_are_rescaled_to_the_measured_loss_between_measured_ranks() -> None:
    gains = {"a": torch.linspace(2.0, 0.1, 20).double(), "b": torch.linspace(1.0, 0.1, 20).double()}
    tail_a = float(gains["a"][5:].sum())
    measured = {"a": {5: 3.0 * tail_a, 15: 3.0 * float(gains["a"][15:].sum())}, "b": {}}
    calibrated = calibrated_gains(gains, measured)
    assert float(calibrated["a"][5:].sum()) == pytest.approx(3.0 * tail_a)
    assert float(calibrated["a"].sum()) == pytest.approx(3.0 * float(gains["a"].sum()))
    # no measurement: the median ratio (here 3)
    assert float(calibrated["b"].sum()) == pytest.approx(3.0 * float(gains["b"].sum()))


def test_a_noise_level_measurement_is_clipped_not_free() -> None:
    gains = {n: torch.ones(10, dtype=torch.float64) for n in "abc"}
    measured = {"a": {3: 7.0}, "b": {3: 7.0}, "c": {3: -0.5}}  # c measured below zero
    calibrated = calibrated_gains(gains, measured)
    assert float(calibrated["c"].sum()) == pytest.approx(float(calibrated["a"].sum()) / 20)


def test_a_layer_measured_worse_than_estimated_gets_more_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planned ranks are corrected by the measurement: a layer whose truncation costs far
    more than its estimate keeps more rank, within the same budget."""
    import rankwise.allocation.estimate as estimate

    model = make_model("llama")
    recipe = {"calib_dtype": "float32", "allocation": "importance", "ratio": 0.5}
    windows = make_windows(8, 16)
    before = rankwise.compress(copy.deepcopy(model), Recipe(**recipe), windows=windows).ranks
    hurt = "model.layers.1.self_attn.o_proj"
    real = estimate.sensitivity.single_layer_losses

    def inflated(*args: object, **kwargs: object) -> dict:
        found = real(*args, **kwargs)
        rank, loss = found[hurt]
        return {**found, hurt: (rank, abs(loss) * 1e3 + 10.0)}

    monkeypatch.setattr(estimate.sensitivity, "single_layer_losses", inflated)
    result = rankwise.compress(model, Recipe(**recipe, importance_measure=1), windows=windows)
    assert 0.5 <= result.targeted_ratio <= 0.505
    after = result.ranks
    assert after[hurt] is None or before[hurt] is not None and after[hurt] > before[hurt]
    assert "importance measure 1" in result.seconds


def test_measurement_runs_on_the_dense_model_in_the_last_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rankwise.allocation.estimate as estimate

    seen = spy_compressed(monkeypatch, estimate.sensitivity, "single_layer_losses")
    recipe = Recipe(calib_dtype="float32", ratio=0.5, importance_rounds=2, importance_measure=2)
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows(8, 16))
    assert seen == [False, False]  # two passes, after round 2 put the dense layers back
    assert 0.5 <= result.targeted_ratio <= 0.505
