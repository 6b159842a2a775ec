"""Orchestration: targets -> statistics -> ranks -> factors -> LowRankLinear, with accounting.

The math lives in `methods/`; this module owns the loop, the checks, the timing and the
per-layer log line (name, shape, rank kept, relative error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.allocation.budget import targeted_params
from rankwise.allocation.estimate import (
    measured_estimate,
    refit_fisher,
)
from rankwise.allocation.plan import (
    Allocation,
    Estimate,
    allocation_possible,
    high_ratio_advice,
    originals,
    plan_ranks,
    restore,
    rounds,
)
from rankwise.calibration.blocks import find_blocks
from rankwise.calibration.run import CalibrationRun
from rankwise.calibration.staged import BlockProgress
from rankwise.core import parallel
from rankwise.core.errors import NonFiniteWeightsError
from rankwise.core.hardware import resolve_device, resolve_dtypes
from rankwise.core.progress import Reporter, Timer
from rankwise.core.recipe import Recipe
from rankwise.methods import get_method
from rankwise.model.accounting import LayerShape, count_parameters
from rankwise.model.modules import linear_weight
from rankwise.model.targets import find_targets
from rankwise.pipeline.checkpoint import CompressCheckpoint, fingerprint
from rankwise.pipeline.layer_loop import LayerLoop
from rankwise.pipeline.modular import compress_modular
from rankwise.pipeline.sharing import agree_ranks
from rankwise.pipeline.strategies import Sequential, Strategy, choose_strategy
from rankwise.storage.manifest import LayerEntry


@dataclass
class Compressed:
    """The compressed model (changed in place) and honest accounting of what was removed."""

    model: nn.Module
    recipe: Recipe
    layers: list[LayerEntry]  # every target in model order, as the manifest saves it
    model_params_before: int
    model_params_after: int
    targeted_before: int
    targeted_after: int
    seconds: dict[str, float] = field(default_factory=dict)
    recovery: dict[str, object] | None = None  # what distillation did, when it ran
    allocation: Allocation | None = None  # the ranks and the loss curves they came from

    @property
    def ranks(self) -> dict[str, int | None]:
        return {layer.name: layer.rank for layer in self.layers}

    @property
    def targeted_ratio(self) -> float:
        """Fraction of the targeted layers' weight parameters removed."""
        return 1.0 - self.targeted_after / self.targeted_before

    @property
    def model_ratio(self) -> float:
        """Fraction of the whole model's parameters removed (embeddings and head included)."""
        return 1.0 - self.model_params_after / self.model_params_before


def output_dtype(recipe: Recipe, model: nn.Module) -> str:
    """The saved weights' dtype: the recipe's, or ("auto") the dtype the model holds (the CLI
    passes the source's, since it loads every source in float32)."""
    if recipe.dtype != "auto":
        return recipe.dtype
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def check_finite(model: nn.Module, names: list[str]) -> None:
    for name in names:
        if not torch.isfinite(linear_weight(model.get_submodule(name))).all():
            raise NonFiniteWeightsError(f"weight of {name} holds NaN or Inf; refusing to compress")


def compress(
    model: nn.Module,
    recipe: Recipe,
    tokenizer: object | None = None,
    windows: torch.Tensor | None = None,
    reporter: Reporter | None = None,
    checkpoint: CompressCheckpoint | None = None,
) -> Compressed:
    """Compress `model` in place following `recipe`; returns the model with its accounting.

    `windows` (count, seq_len) token ids override the recipe's calibration text (tests use it).
    With `recipe.sequential`, each block's statistics are gathered after the blocks before it
    were compressed, so later layers correct for earlier errors. With `checkpoint`, each
    finished block is recorded there, and a run killed mid-way continues from the last one
    (pipeline/checkpoint.py; the caller clears the directory for a fresh run).
    """
    reporter = reporter or Reporter()
    device = parallel.local_device(resolve_device(recipe.device))
    recipe, dtype_line = resolve_dtypes(recipe, device)
    recipe = recipe.merged(device=str(device), dtype=output_dtype(recipe, model))
    reporter.log(f"{dtype_line}; device {device}; saved weights in {recipe.dtype}")
    if recipe.method == "modular" or recipe.portable:  # narrowed MLPs: pipeline/modular.py
        return Compressed(**compress_modular(model, recipe, tokenizer, windows, reporter))
    model.eval()
    names = find_targets(model, recipe.targets, recipe.ignore)
    check_finite(model, names)
    method = get_method(recipe.method)
    recipe = allocation_possible(model, method, recipe, tokenizer, windows, reporter)
    params_before = count_parameters(model)
    shapes = {n: LayerShape(n, *linear_weight(model.get_submodule(n)).shape) for n in names}
    run = CalibrationRun(
        model, names, shapes, method, recipe, tokenizer, windows, reporter, Timer()
    )
    strategy = choose_strategy(run)
    resume = resumable(run, strategy, checkpoint)
    if resume is not None and resume.has_estimate():
        estimate, first_round = resume.saved_estimate(), rounds(recipe)
        reporter.log(f"resuming from {resume.directory}")
    else:
        estimate, first_round = strategy.estimate(), 1
    advice = high_ratio_advice(recipe)
    if estimate is not None and advice:
        reporter.log(advice)
    dense_targets = originals(model, names) if rounds(recipe) > first_round else {}
    allocation = allocate(run, estimate)
    done = compress_in_rounds(
        run, strategy, Rounds(estimate, allocation, first_round), dense_targets, resume
    )
    allocation = done.allocation
    assert done.loop is not None, "every run factorizes at least once"
    layers = [done.loop.entries[n] for n in names]
    dense, _ = targeted_params(list(shapes.values()), allocation.ranks)
    kept = sum(layer.count.kept_params for layer in layers)  # sparse layers: values + indices
    reporter.log(
        f"targeted ratio: requested {recipe.ratio:.4f}, achieved {1 - kept / dense:.4f} "
        f"({recipe.allocation} allocation)"
    )
    for layer in layers:
        layer.est_loss = allocation.estimated_loss(layer.name, allocation.ranks[layer.name])
    return Compressed(
        model, recipe, layers, params_before, count_parameters(model), dense, kept,
        run.timer.seconds, allocation=allocation,
    )  # fmt: skip


@dataclass
class Rounds:
    """Where the rounds loop starts (round `first`, a resumed run: the last) and, at the end,
    the last allocation and the loop that applied it."""

    estimate: Estimate | None
    allocation: Allocation
    first: int = 1
    loop: LayerLoop | None = None


def compress_in_rounds(
    run: CalibrationRun,
    strategy: Strategy,
    state: Rounds,
    dense_targets: dict[str, nn.Module],
    checkpoint: CompressCheckpoint | None = None,
) -> Rounds:
    """Factorize every target; importance rounds after the first reallocate by the Fisher of
    the model as compressed, put the dense targets back and compress again; measured passes
    correct the last round's plan (allocation/plan.py). With a checkpoint, the last round
    records its estimate and each finished block, and continues from what it holds."""
    total = rounds(run.recipe)
    estimate, allocation = state.estimate, state.allocation
    for round_ in range(state.first, total + 1):
        if round_ > state.first:
            assert estimate is not None, "rounds need importance allocation"
            estimate = refit_fisher(run, estimate, round_)  # the model as compressed now
            allocation = allocate(run, estimate)
            restore(run.model, dense_targets)
        fresh = checkpoint is None or not checkpoint.has_estimate()  # else measured before
        if round_ == total and run.recipe.importance_measure and estimate is not None and fresh:
            estimate, allocation = measured_estimate(run, estimate, allocation)
        with run.reporter.task("factorizing", total=len(run.shapes)) as advance:
            with run.timer.phase(strategy.phase):
                loop = LayerLoop(run, allocation.ranks, advance)
                if round_ == total and checkpoint is not None:
                    strategy.factorize(loop, checkpointed(run, loop, estimate, checkpoint))
                else:
                    strategy.factorize(loop)
    return Rounds(estimate, allocation, state.first, loop)


def resumable(
    run: CalibrationRun, strategy: Strategy, checkpoint: CompressCheckpoint | None
) -> CompressCheckpoint | None:
    """The checkpoint, fingerprinted, where the strategy can resume (sequential runs)."""
    if checkpoint is None:
        return None
    if not isinstance(strategy, Sequential):
        run.reporter.log("a one-pass run does not checkpoint: --resume starts it again")
        return None
    if parallel.world().size > 1:
        run.reporter.log("runs of several processes do not checkpoint yet: --resume starts again")
        return None
    checkpoint.fingerprint = fingerprint(run.recipe, run.token_windows(), run.model)
    return checkpoint


def checkpointed(
    run: CalibrationRun, loop: LayerLoop, estimate: Estimate | None, checkpoint: CompressCheckpoint
) -> BlockProgress:
    """Restore what the checkpoint holds into the model and the loop; record every block."""
    if not checkpoint.has_estimate():
        checkpoint.save_estimate(estimate, run.names)
    start, hidden, entries = checkpoint.restore(run.model)
    for entry in entries:
        loop.entries[entry.name] = entry
        loop.advance(1)
    if start:
        run.reporter.log(f"blocks before {start} restored from {checkpoint.directory}")
    list_name, _ = find_blocks(run.model, run.names)

    def block_done(index: int, outputs: list[torch.Tensor]) -> None:
        prefix = f"{list_name}.{index}."
        finished = [loop.entries[n] for n in run.names if n.startswith(prefix)]
        checkpoint.save_block(index, finished, run.model, outputs)

    return BlockProgress(start, hidden, block_done)


def allocate(run: CalibrationRun, estimate: Estimate | None) -> Allocation:
    """`plan_ranks`, timed and logged."""
    with run.timer.phase("allocate"):
        allocation = plan_ranks(run.shapes, estimate, run.recipe)
    agreed = agree_ranks(allocation.ranks, run.names, run.device)
    allocation = Allocation(agreed, allocation.gains)
    if estimate is not None:
        run.reporter.log(f"importance allocation in {run.timer.seconds['allocate']:.2f} s")
    return allocation
