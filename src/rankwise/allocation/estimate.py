"""Measuring the importance estimate that `plan_ranks` spends the budget by (orchestration).

Each function runs passes over calibration windows and returns a new `Estimate`; none keeps
state, so the order of calls is the compression's loop, written once in pipeline/compress.py:
dense (or from statistics) first, then the Fisher of the model as compressed in a later round,
then measured sensitivity in the last round.
"""

from __future__ import annotations

import torch

from rankwise.allocation import importance, sensitivity
from rankwise.allocation.plan import Allocation, Estimate, needs_output_fisher, plan_ranks
from rankwise.calibration import statistics
from rankwise.calibration.run import CalibrationRun
from rankwise.calibration.statistics import Statistics
from rankwise.model.memory import release_freed_memory


def dense_estimate(run: CalibrationRun) -> Estimate:
    """Dense spectra (block by block) and output Fisher on the importance windows."""
    subset = run.importance_windows()
    blocks = statistics.count_blocks(run.model, run.names)
    want_fisher = needs_output_fisher(run.recipe)
    fisher: dict[str, torch.Tensor | None] = {name: None for name in run.names}
    with run.reporter.task("importance", total=blocks + len(subset) * want_fisher) as advance:
        with run.timer.phase("importance spectra"):
            spectra = importance.spectra_blockwise(run, subset, advance)
        if want_fisher:
            with run.timer.phase("importance fisher"):
                fisher.update(output_fisher(run, subset, advance))
    release_freed_memory()  # the bf16 copy and logits of the Fisher pass
    return Estimate(spectra, fisher)


def estimate_from_statistics(run: CalibrationRun, stats: Statistics) -> Estimate:
    """Spectra and output Fisher from statistics already gathered (one pass, or a file)."""
    with run.timer.phase("spectra"):
        spectra = importance.spectra_from_stats(run, stats)
    return Estimate(spectra, {name: stats.layers[name].output_fisher for name in run.names})


def refit_fisher(run: CalibrationRun, estimate: Estimate, round_: int) -> Estimate:
    """The estimate with the output Fisher of the model as compressed now (same spectra)."""
    subset = run.importance_windows()
    with run.reporter.task(f"importance round {round_}", total=len(subset)) as advance:
        with run.timer.phase(f"importance fisher round {round_}"):
            fisher = output_fisher(run, subset, advance)
    return estimate.with_fisher(dict(fisher))


def measured_estimate(
    run: CalibrationRun, estimate: Estimate, allocation: Allocation
) -> tuple[Estimate, Allocation]:
    """`importance_measure` passes on the dense model: each target truncated alone to its
    planned rank, the loss measured, the curves rescaled, the budget allocated again."""
    blocks = statistics.count_blocks(run.model, run.names)
    for pass_ in range(1, run.recipe.importance_measure + 1):
        with run.reporter.task(f"measuring importance {pass_}", total=blocks) as advance:
            with run.timer.phase(f"importance measure {pass_}"):
                found = sensitivity.single_layer_losses(
                    run, allocation.ranks, advance, known=estimate.measured
                )
        estimate = estimate.with_measured(found)
        allocation = plan_ranks(run.shapes, estimate, run.recipe)
    return estimate, allocation


def output_fisher(
    run: CalibrationRun, windows: torch.Tensor, advance: statistics.Progress
) -> dict[str, torch.Tensor]:
    return statistics.collect_output_fisher(
        run.model, run.names, windows, run.dtype, advance, device=run.device
    )
