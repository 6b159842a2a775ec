"""Calibration strategies: how one compression gathers statistics and factorizes.

Each has one entry point per step: `estimate()` (the importance estimate the first ranks come
from; None for uniform) and `factorize(loop)` (every layer, through the layer loop).
`choose_strategy` picks one from the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rankwise.allocation.estimate import (
    dense_estimate,
    estimate_from_statistics,
)
from rankwise.allocation.plan import (
    Estimate,
    needs_output_fisher,
)
from rankwise.calibration import staged
from rankwise.calibration import statistics as calibrate
from rankwise.calibration.blocks import in_one_block_list
from rankwise.calibration.gather import gather_statistics
from rankwise.calibration.run import CalibrationRun
from rankwise.calibration.staged import BlockProgress
from rankwise.calibration.statistics import Statistics
from rankwise.methods import LayerStats
from rankwise.pipeline.layer_loop import LayerLoop


def choose_strategy(run: CalibrationRun) -> Strategy:
    """Block by block where it applies (sequential, staged inside blocks by default), else all
    statistics first (one pass, or a statistics file)."""
    if not blockwise_applies(run):
        return FromStatistics(run)
    if not run.recipe.sequential:
        return BlockByBlock(run)
    return Staged(run) if run.recipe.staged else Sequential(run)


def blockwise_applies(run: CalibrationRun) -> bool:
    """Whether each block is factorized as soon as its grams are complete.

    Sequential calibration needs it. A one-pass run takes it too when nothing needs every
    layer's statistics first (uniform ranks, grams only, no statistics file to write): memory
    then holds one block's grams instead of all of them (SmolLM2: 0.8 GB of float64).
    """
    recipe, method = run.recipe, run.method
    if recipe.stats or "input_gram" not in method.needs:
        return False
    if not recipe.sequential and (recipe.allocation != "uniform" or method.needs != {"input_gram"}):
        return False
    if not in_one_block_list(run.model, run.names):
        run.reporter.log("targets are not all inside one list of blocks: one whole-model pass")
        return False
    return True


class Strategy(Protocol):
    """How one compression gathers statistics and factorizes: the estimate the first ranks
    come from (None: uniform), then every layer factorized."""

    phase: str

    def estimate(self) -> Estimate | None: ...

    def factorize(self, loop: LayerLoop, progress: BlockProgress | None = None) -> None: ...


class _Blockwise:
    """Each block factorized as soon as its statistics are complete; the importance estimate
    comes from a dense pass of its own first."""

    phase = "calibrate+factorize"

    def __init__(self, run: CalibrationRun) -> None:
        self.run = run

    def estimate(self) -> Estimate | None:
        return dense_estimate(self.run) if self.run.recipe.allocation == "importance" else None

    def on_group(self, loop: LayerLoop) -> Callable[[list[str], dict[str, LayerStats]], None]:
        return loop.group


class BlockByBlock(_Blockwise):
    """Every block's grams from the original model's inputs (one pass, one block in memory)."""

    def factorize(self, loop: LayerLoop, progress: BlockProgress | None = None) -> None:
        run = self.run
        calibrate.collect_grams(
            run.model, run.names, run.token_windows(), run.dtype,
            after_block=self.on_group(loop), output_grams=run.method.output_grams,
            device=run.device,
        )  # fmt: skip


class Sequential(_Blockwise):
    """Block k's grams from the model whose blocks before k are compressed; inside a block,
    dense grams first, then the compressed block's outputs for the next."""

    staged = False

    def factorize(self, loop: LayerLoop, progress: BlockProgress | None = None) -> None:
        run = self.run
        staged.compress_sequential(
            run.model, run.names, run.token_windows(), run.dtype, self.on_group(loop),
            run.method.output_grams, staged=self.staged, device=run.device, progress=progress,
        )  # fmt: skip


class Staged(Sequential):
    """Sequential, and inside each block group by group (calibration/staged.py)."""

    staged = True


class FromStatistics:
    """Every layer's statistics gathered first (or read from a statistics file), then factorized:
    one pass, for methods and allocations that need all statistics before any rank."""

    phase = "factorize"

    def __init__(self, run: CalibrationRun) -> None:
        self.run = run
        self.stats: Statistics | None = None

    def estimate(self) -> Estimate | None:
        run = self.run
        fisher = {"output_fisher"} if needs_output_fisher(run.recipe) else set()
        with run.timer.phase("calibrate"):
            self.stats = gather_statistics(run, run.method.needs | fisher)
        if run.recipe.allocation != "importance":
            return None
        return estimate_from_statistics(run, self.stats)

    def factorize(self, loop: LayerLoop, progress: BlockProgress | None = None) -> None:
        assert self.stats is not None, "estimate() gathers the statistics"
        loop.group(self.run.names, self.stats.layers)
