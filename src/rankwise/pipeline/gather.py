"""Where a run's statistics come from: a saved file, calibration, or both (a file is completed
with what it lacks and written back, so a ratio sweep calibrates once)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rankwise.allocation import importance
from rankwise.calibration import statistics as calibrate
from rankwise.calibration.statistics import Statistics
from rankwise.core.errors import CalibrationError
from rankwise.core.hardware import compute_dtype
from rankwise.core.progress import Reporter
from rankwise.core.recipe import Recipe
from rankwise.data.corpora import calibration_windows
from rankwise.methods import LayerStats


def gather_statistics(
    model: nn.Module,
    names: list[str],
    needs: frozenset[str],
    recipe: Recipe,
    tokenizer: object | None,
    windows: torch.Tensor | None,
    reporter: Reporter,
    output_grams: bool = False,
) -> Statistics:
    """Statistics holding `needs`: from recipe.stats where it has them, the rest gathered.

    A statistics file missing something (e.g. output_fisher for importance) is completed and
    written back, so a sweep calibrates once. `output_grams` (a method that takes them, and no
    file to write): narrow targets get the gram of their outputs instead of their inputs.
    """
    stats = Statistics({n: LayerStats() for n in names})
    if recipe.stats and Path(recipe.stats).is_file():
        stats = Statistics.load(recipe.stats)
        reporter.log(f"statistics read from {recipe.stats}")
    missing = frozenset(need for need in needs if not stats.has({need}, names))
    if not missing:
        return stats
    windows = resolve_windows(recipe, tokenizer, windows, reporter)
    dtype = compute_dtype(recipe.calib_dtype)
    output_grams = output_grams and not recipe.stats  # a statistics file holds input grams
    gathered = collect_missing(
        model, names, windows, missing, recipe, dtype, reporter, output_grams
    )
    stats = merge_statistics(stats, gathered, names)
    if recipe.stats:
        stats.save(recipe.stats)
        reporter.log(f"statistics saved to {recipe.stats}")
    return stats


def collect_missing(
    model: nn.Module,
    names: list[str],
    windows: torch.Tensor,
    needs: frozenset[str],
    recipe: Recipe,
    dtype: torch.dtype,
    reporter: Reporter,
    output_grams: bool = False,
) -> Statistics:
    subset = importance.importance_windows(recipe, windows)
    total = (
        calibrate.count_blocks(model, names) * ("input_gram" in needs)
        + len(windows) * ("fisher" in needs)
        + len(subset) * ("output_fisher" in needs)
    )
    with reporter.task("calibrating", total=total) as advance:
        found = needs - {"output_fisher"}
        stats = calibrate.collect(model, names, windows, found, dtype, advance, output_grams)
        if "output_fisher" in needs:
            found = calibrate.collect_output_fisher(model, names, subset, dtype, advance)
            for name, value in found.items():
                stats.layers[name].output_fisher = value
    return stats


def merge_statistics(base: Statistics, new: Statistics, names: list[str]) -> Statistics:
    """`base` with every statistic `new` holds filled in."""
    for name in names:
        into = base.layers.setdefault(name, LayerStats())
        got = new.layers[name]
        for field_name in ("input_gram", "output_gram", "fisher", "output_fisher"):
            if getattr(got, field_name) is not None:
                setattr(into, field_name, getattr(got, field_name))
        if got.input_gram is not None or got.output_gram is not None:
            into.tokens = got.tokens
    base.meta.update(new.meta)
    return base


def resolve_windows(
    recipe: Recipe, tokenizer: object | None, windows: torch.Tensor | None, reporter: Reporter
) -> torch.Tensor:
    if windows is not None:
        return windows
    if tokenizer is None:
        raise CalibrationError("calibration needs a tokenizer or token windows")
    windows = calibration_windows(tokenizer, recipe.calib, recipe.samples, recipe.seq_len)
    if len(windows) < recipe.samples:
        reporter.log(
            f"warning: calibration text gives {len(windows)} windows of {recipe.seq_len} tokens "
            f"(asked {recipe.samples})"
        )
    return windows
