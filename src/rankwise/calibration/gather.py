"""Where a run's statistics come from: a saved file, calibration, or both (a file is completed
with what it lacks and written back, so a ratio sweep calibrates once)."""

from __future__ import annotations

from pathlib import Path

from rankwise.calibration import statistics as calibrate
from rankwise.calibration.run import CalibrationRun
from rankwise.calibration.statistics import Statistics
from rankwise.methods import LayerStats


def gather_statistics(run: CalibrationRun, needs: frozenset[str]) -> Statistics:
    """Statistics holding `needs`: from recipe.stats where it has them, the rest gathered.

    A statistics file missing something (e.g. output_fisher for importance) is completed and
    written back, so a sweep calibrates once. A method taking `output_grams`, with no file to
    write: narrow targets get the gram of their outputs instead of their inputs.
    """
    recipe, names = run.recipe, run.names
    stats = Statistics({n: LayerStats() for n in names})
    if recipe.stats and Path(recipe.stats).is_file():
        stats = Statistics.load(recipe.stats)
        run.reporter.log(f"statistics read from {recipe.stats}")
    missing = frozenset(need for need in needs if not stats.has({need}, names))
    if not missing:
        return stats
    output_grams = run.method.output_grams and not recipe.stats  # a file holds input grams
    stats = merge_statistics(stats, collect_missing(run, missing, output_grams), names)
    if recipe.stats:
        stats.save(recipe.stats)
        run.reporter.log(f"statistics saved to {recipe.stats}")
    return stats


def collect_missing(run: CalibrationRun, needs: frozenset[str], output_grams: bool) -> Statistics:
    model, names, windows, dtype = run.model, run.names, run.token_windows(), run.dtype
    subset = run.importance_windows()
    total = (
        calibrate.count_blocks(model, names) * ("input_gram" in needs)
        + len(windows) * ("fisher" in needs)
        + len(subset) * ("output_fisher" in needs)
    )
    with run.reporter.task("calibrating", total=total) as advance:
        found = needs - {"output_fisher"}
        stats = calibrate.collect(
            model, names, windows, found, dtype, advance, output_grams, run.device
        )
        if "output_fisher" in needs:
            fisher = calibrate.collect_output_fisher(
                model, names, subset, dtype, advance, device=run.device
            )
            for name, value in fisher.items():
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
