"""Orchestration: targets -> statistics -> ranks -> factors -> LowRankLinear, with accounting.

The math lives in `methods/`; this module owns the loop, the checks, the timing and the
per-layer log line (name, shape, rank kept, relative error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from rankwise.allocation.budget import targeted_params
from rankwise.allocation.estimate import (
    dense_estimate,
    estimate_from_statistics,
    measured_estimate,
    refit_fisher,
)
from rankwise.allocation.plan import (
    Allocation,
    Estimate,
    allocation_possible,
    high_ratio_advice,
    needs_output_fisher,
    originals,
    plan_ranks,
    restore,
    rounds,
)
from rankwise.calibration import staged
from rankwise.calibration import statistics as calibrate
from rankwise.calibration.blocks import in_one_block_list
from rankwise.calibration.gather import gather_statistics
from rankwise.calibration.run import CalibrationRun
from rankwise.calibration.statistics import Statistics
from rankwise.core.errors import NonFiniteWeightsError
from rankwise.core.hardware import resolve_device, resolve_dtypes
from rankwise.core.progress import Reporter, Timer
from rankwise.core.recipe import Recipe
from rankwise.methods import Factors, LayerStats, Method, MethodOptions, get_method
from rankwise.model.accounting import LayerShape, count_parameters
from rankwise.model.layers import factored_layer
from rankwise.model.modules import as_linear, linear_weight, set_module
from rankwise.model.targets import find_targets
from rankwise.pipeline.modular import compress_modular
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


def relative_error(spectrum: torch.Tensor | None, rank: int) -> float:
    """sqrt of the dropped share of the spectrum's energy: the relative error in the method's metric
    (weight error for svd, calibration output error for whiten, Fisher-weighted for fwsvd)."""
    if spectrum is None:
        return float("nan")
    energy = spectrum.double().square()
    return float((energy[rank:].sum() / energy.sum().clamp_min(1e-300)).sqrt())


def factorize_layer(
    model: nn.Module,
    name: str,
    rank: int,
    method: Method,
    stats: LayerStats,
    options: MethodOptions,
    device: torch.device | None = None,
) -> Factors:
    """Replace one target by its factors (in place) and return them. The math runs on `device`
    (where the statistics are); the factors come back to where the model's weight is."""
    module = as_linear(model.get_submodule(name))
    home = module.weight.device
    weight = module.weight.detach().to(device or home)
    factors = method.factorize(weight, stats, rank, options).to(home)
    bias = module.bias.detach() if module.bias is not None else None
    # Block-by-block runs factorize inside the calibration's inference_mode: the layer's own
    # tensors are made outside it, or recovery could not train them (inference tensors never
    # join autograd).
    with torch.inference_mode(False):
        layer = factored_layer(factors.left, factors.right, factors.sparse, bias)
    set_module(model, name, layer)
    return factors


def stats_on(run: CalibrationRun, stats: LayerStats) -> LayerStats:
    """A layer's statistics on the run's device; a gram shared by several layers (gate/up,
    q/k/v) moves once, through the run's GramCache, so it stays shared there."""
    gram = stats.input_gram
    moved = stats.to(run.device)
    if gram is not None and gram.device != run.device:
        move = lambda: gram.to(run.device)  # noqa: E731
        moved.input_gram = run.options.cache.get("on device", gram, 0.0, move)
    return moved


class LayerLoop:
    """Factorizes layers one by one, logging a line per layer and keeping their entries."""

    def __init__(
        self, run: CalibrationRun, ranks: dict[str, int | None], advance: Callable[[int], None]
    ) -> None:
        self.run, self.ranks, self.advance = run, ranks, advance
        self.entries: dict[str, LayerEntry] = {}

    def __call__(self, name: str, stats: LayerStats) -> None:
        run, shape, rank = self.run, self.run.shapes[name], self.ranks[name]
        bias = as_linear(run.model.get_submodule(name)).bias is not None
        error, nnz, rounds_ = 0.0, 0, ""
        if rank is not None:
            on_device = stats_on(run, stats)
            factors = factorize_layer(
                run.model, name, rank, run.method, on_device, run.options, run.device
            )
            error = factors.rel_error
            if error is None:
                error = relative_error(factors.spectrum, rank)
            rank = factors.left.shape[1]  # a sparse residual spends part of the rank's budget
            nnz = factors.sparse.nnz if factors.sparse is not None else 0
            if factors.refinement:
                rounds_ = "  by round " + " ".join(f"{e:.4f}" for e in factors.refinement)
        self.entries[name] = LayerEntry(
            name=name, out_features=shape.out_features, in_features=shape.in_features,
            rank=rank, bias=bias, nnz=nnz, rel_error=error,
        )  # fmt: skip
        kept = "dense" if rank is None else f"rank {rank:>4}" + (f" nnz {nnz}" if nnz else "")
        run.reporter.log(
            f"{name:<40} {shape.out_features:>5}x{shape.in_features:<5} "
            f"{kept}  rel.err {error:.4f}{rounds_}"
        )
        self.advance(1)


def compress(
    model: nn.Module,
    recipe: Recipe,
    tokenizer: object | None = None,
    windows: torch.Tensor | None = None,
    reporter: Reporter | None = None,
) -> Compressed:
    """Compress `model` in place following `recipe`; returns the model with its accounting.

    `windows` (count, seq_len) token ids override the recipe's calibration text (tests use it).
    With `recipe.sequential`, each block's statistics are gathered after the blocks before it
    were compressed, so later layers correct for earlier errors.
    """
    if recipe.method == "modular" or recipe.portable:  # narrowed MLPs: pipeline/modular.py
        return Compressed(**compress_modular(model, recipe, tokenizer, windows, reporter))
    reporter = reporter or Reporter()
    device = resolve_device(recipe.device)
    recipe, dtype_line = resolve_dtypes(recipe, device)
    recipe = recipe.merged(device=str(device), dtype=output_dtype(recipe, model))
    reporter.log(f"{dtype_line}; device {device}; saved weights in {recipe.dtype}")
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
    estimate = strategy.estimate()
    advice = high_ratio_advice(recipe)
    if estimate is not None and advice:
        reporter.log(advice)
    dense_targets = originals(model, names) if rounds(recipe) > 1 else {}
    done = compress_in_rounds(run, strategy, estimate, allocate(run, estimate), dense_targets)
    allocation = done.allocation
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
    """What the rounds loop ends with: the last allocation and the loop that applied it."""

    allocation: Allocation
    loop: LayerLoop


def compress_in_rounds(
    run: CalibrationRun,
    strategy: Strategy,
    estimate: Estimate | None,
    allocation: Allocation,
    dense_targets: dict[str, nn.Module],
) -> Rounds:
    """Factorize every target; importance rounds after the first reallocate by the Fisher of
    the model as compressed, put the dense targets back and compress again; measured passes
    correct the last round's plan (allocation/plan.py)."""
    total = rounds(run.recipe)
    for round_ in range(1, total + 1):
        if round_ > 1:
            assert estimate is not None, "rounds need importance allocation"
            estimate = refit_fisher(run, estimate, round_)  # the model as compressed now
            allocation = allocate(run, estimate)
            restore(run.model, dense_targets)
        if round_ == total and run.recipe.importance_measure and estimate is not None:
            estimate, allocation = measured_estimate(run, estimate, allocation)
        with run.reporter.task("factorizing", total=len(run.shapes)) as advance:
            with run.timer.phase(strategy.phase):
                loop = LayerLoop(run, allocation.ranks, advance)
                strategy.factorize(loop)
    return Rounds(allocation, loop)


def allocate(run: CalibrationRun, estimate: Estimate | None) -> Allocation:
    """`plan_ranks`, timed and logged."""
    with run.timer.phase("allocate"):
        allocation = plan_ranks(run.shapes, estimate, run.recipe)
    if estimate is not None:
        run.reporter.log(f"importance allocation in {run.timer.seconds['allocate']:.2f} s")
    return allocation


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

    def factorize(self, loop: LayerLoop) -> None: ...


class _Blockwise:
    """Each block factorized as soon as its statistics are complete; the importance estimate
    comes from a dense pass of its own first."""

    phase = "calibrate+factorize"

    def __init__(self, run: CalibrationRun) -> None:
        self.run = run

    def estimate(self) -> Estimate | None:
        return dense_estimate(self.run) if self.run.recipe.allocation == "importance" else None

    def on_group(self, loop: LayerLoop) -> Callable[[list[str], dict[str, LayerStats]], None]:
        def factorize(group_names: list[str], stats: dict[str, LayerStats]) -> None:
            for name in group_names:
                loop(name, stats[name])

        return factorize


class BlockByBlock(_Blockwise):
    """Every block's grams from the original model's inputs (one pass, one block in memory)."""

    def factorize(self, loop: LayerLoop) -> None:
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

    def factorize(self, loop: LayerLoop) -> None:
        run = self.run
        staged.compress_sequential(
            run.model, run.names, run.token_windows(), run.dtype, self.on_group(loop),
            run.method.output_grams, staged=self.staged, device=run.device,
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

    def factorize(self, loop: LayerLoop) -> None:
        assert self.stats is not None, "estimate() gathers the statistics"
        for name in self.run.names:
            loop(name, self.stats.layers[name])
