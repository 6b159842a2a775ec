"""Importance-aware allocation: each layer's loss-versus-rank curve, then one global greedy.

The estimator. Truncating layer l to rank r changes its output by e (per token), and the loss by
about 0.5 * e^T F e (F: Fisher of the loss w.r.t. that output). With F replaced by its mean
diagonal f_l = mean over tokens and units of (d loss / d output)^2, the loss increase is
0.5 * f_l * ||e||^2, and for `whiten` ||e||^2 summed over the calibration tokens is exactly the
sum of the dropped squared singular values of W S. So the loss removed by keeping component i of
layer l is estimated as f_l * s_i^2 (`gains`), and `allocate_importance` buys components in
decreasing order of that gain per parameter. For `svd` and `fwsvd` the spectrum measures the
weight error (Fisher-row-weighted for fwsvd), so the same product is a rougher estimate.

Why this one: it needs one backward pass over a few windows (no weight gradients) instead of a
search that truncates each layer and re-measures the loss, and the whiten spectra it multiplies
are free. The measured comparison against unweighted and normalised curves is in
bench/results/allocation.md.
"""

from __future__ import annotations

import torch

from rankwise.allocation.budget import allocate_importance
from rankwise.calibration import statistics as calibrate
from rankwise.calibration.run import CalibrationRun
from rankwise.calibration.statistics import Progress, Statistics
from rankwise.core.errors import CalibrationError
from rankwise.core.recipe import Recipe
from rankwise.model.accounting import LayerShape
from rankwise.model.modules import linear_weight


def layer_gains(
    spectrum: torch.Tensor, output_fisher: torch.Tensor | None, estimator: str = "fisher"
) -> torch.Tensor:
    """Estimated loss removed by each singular component, float64 (k,).

    "fisher": f_l * s_i^2 (the estimator above). The two alternatives, kept for comparison:
    "output_error": s_i^2 alone; "relative": s_i^2 / sum(s^2).
    """
    energy = spectrum.double().square()  # (k,)
    if estimator == "output_error":
        return energy
    if estimator == "relative":
        return energy / energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
    if output_fisher is None:
        raise CalibrationError("importance allocation needs output_fisher statistics")
    return energy * output_fisher.double().mean()


def spectra_from_stats(run: CalibrationRun, stats: Statistics) -> dict[str, torch.Tensor]:
    """Each target's spectrum in the method's metric, from statistics already gathered."""
    return {
        name: run.method.spectrum(
            weight_of(run, name), stats.layers[name].to(run.device), run.options
        ).cpu()
        for name in run.names
    }


def spectra_blockwise(
    run: CalibrationRun, windows: torch.Tensor, progress: Progress | None = None
) -> dict[str, torch.Tensor]:
    """Spectra of the dense model, one block at a time: each block's grams are dropped as soon
    as its spectra are known (sequential calibration then recomputes grams on the compressed
    prefix for the factors themselves)."""
    spectra: dict[str, torch.Tensor] = {}

    def after_block(block_names: list[str], block_stats: dict) -> None:
        for name in block_names:
            weight = weight_of(run, name)
            spectra[name] = run.method.spectrum(weight, block_stats[name], run.options).cpu()

    calibrate.collect_grams(
        run.model,
        run.names,
        windows,
        run.dtype,
        progress,
        after_block=after_block,
        output_grams=run.method.output_grams,
        device=run.device,
    )
    return spectra


def weight_of(run: CalibrationRun, name: str) -> torch.Tensor:
    """A target's (out, in) weight on the run's execution device."""
    return linear_weight(run.model.get_submodule(name)).to(run.device)


def allocate(
    shapes: dict[str, LayerShape],
    spectra: dict[str, torch.Tensor],
    output_fisher: dict[str, torch.Tensor | None],
    recipe: Recipe,
) -> tuple[dict[str, int | None], dict[str, torch.Tensor]]:
    """Ranks under the recipe's budget, and each layer's gains (kept for the estimated error)."""
    gains = {
        name: layer_gains(spectra[name], output_fisher[name], recipe.importance_estimator)
        for name in shapes
    }
    ranks = allocate_importance(list(shapes.values()), gains, recipe.ratio, recipe.overrides)
    return ranks, gains


def estimated_loss(gains: torch.Tensor, rank: int | None) -> float:
    """Estimated loss increase (in the estimator's units) of truncating to `rank`."""
    return 0.0 if rank is None else float(gains[rank:].sum())
