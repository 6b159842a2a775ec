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
from rankwise.allocation.plan import (
    Plan,
    allocation_possible,
    needs_output_fisher,
    originals,
    restore,
)
from rankwise.calibration import staged
from rankwise.calibration import statistics as calibrate
from rankwise.calibration.blocks import in_one_block_list
from rankwise.calibration.statistics import Statistics
from rankwise.core.errors import NonFiniteWeightsError
from rankwise.core.hardware import compute_dtype, resolve_dtypes
from rankwise.core.progress import Reporter, Timer
from rankwise.core.recipe import Recipe
from rankwise.methods import Factors, LayerStats, Method, MethodOptions, get_method
from rankwise.model.accounting import LayerCount, LayerShape, count_parameters
from rankwise.model.layers import factored_layer
from rankwise.model.modules import as_linear, linear_weight, set_module
from rankwise.model.targets import find_targets
from rankwise.pipeline.gather import gather_statistics, resolve_windows


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: kept dense
    rel_error: float  # sqrt(dropped / total energy) of the method's spectrum; 0 when dense
    est_loss: float | None = None  # importance allocation's estimated loss increase
    nnz: int = 0  # nonzeros of a sparse residual (method sparse)

    @property
    def count(self) -> LayerCount:
        return LayerCount(self.out_features, self.in_features, self.rank, self.nnz)

    @property
    def kept_params(self) -> int:
        """Weight parameters kept; a sparse residual counts its values and indices (bytes / 4)."""
        return self.count.kept_params

    @property
    def kept_fraction(self) -> float:
        return self.count.kept_fraction


@dataclass
class Compressed:
    """The compressed model (changed in place) and honest accounting of what was removed."""

    model: nn.Module
    recipe: Recipe
    layers: list[LayerReport]
    model_params_before: int
    model_params_after: int
    targeted_before: int
    targeted_after: int
    seconds: dict[str, float] = field(default_factory=dict)
    recovery: dict[str, object] | None = None  # what distillation did, when it ran

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
) -> Factors:
    """Replace one target by its factors (in place) and return them."""
    module = as_linear(model.get_submodule(name))
    factors = method.factorize(module.weight.detach(), stats, rank, options)
    bias = module.bias.detach() if module.bias is not None else None
    # Block-by-block runs factorize inside the calibration's inference_mode: the layer's own
    # tensors are made outside it, or recovery could not train them (inference tensors never
    # join autograd).
    with torch.inference_mode(False):
        layer = factored_layer(factors.left, factors.right, factors.sparse, bias)
    set_module(model, name, layer)
    return factors


class LayerLoop:
    """Factorizes layers one by one, logging a line per layer and keeping the reports."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        recipe: Recipe,
        reporter: Reporter,
        ranks: dict[str, int | None],
        advance: Callable[[int], None],
    ) -> None:
        self.model, self.method, self.reporter = model, method, reporter
        self.ranks, self.advance = ranks, advance
        self.options = MethodOptions(eig_floor=recipe.eig_floor)
        self.reports: dict[str, LayerReport] = {}

    def __call__(self, shape: LayerShape, stats: LayerStats) -> None:
        rank = self.ranks[shape.name]
        error, nnz, rounds = 0.0, 0, ""
        if rank is not None:
            factors = factorize_layer(
                self.model, shape.name, rank, self.method, stats, self.options
            )
            error = factors.rel_error
            if error is None:
                error = relative_error(factors.spectrum, rank)
            rank = factors.left.shape[1]  # a sparse residual spends part of the rank's budget
            nnz = factors.sparse.nnz if factors.sparse is not None else 0
            if factors.refinement:
                rounds = "  by round " + " ".join(f"{e:.4f}" for e in factors.refinement)
        self.reports[shape.name] = LayerReport(
            shape.name, shape.out_features, shape.in_features, rank, error, nnz=nnz
        )
        kept = "dense" if rank is None else f"rank {rank:>4}" + (f" nnz {nnz}" if nnz else "")
        self.reporter.log(
            f"{shape.name:<40} {shape.out_features:>5}x{shape.in_features:<5} "
            f"{kept}  rel.err {error:.4f}{rounds}"
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
    reporter = reporter or Reporter()
    recipe, dtype_line = resolve_dtypes(recipe)
    reporter.log(dtype_line)
    timer = Timer()
    model.eval()
    names = find_targets(model, recipe.targets, recipe.ignore)
    check_finite(model, names)
    method = get_method(recipe.method)
    recipe = allocation_possible(model, method, recipe, tokenizer, windows, reporter)
    params_before = count_parameters(model)
    shapes = {n: LayerShape(n, *linear_weight(model.get_submodule(n)).shape) for n in names}
    plan = Plan(model, names, shapes, method, recipe, reporter, timer)
    rounds = plan.rounds()
    dense_targets = originals(model, names) if rounds > 1 else {}
    run = CalibrationRun(model, names, shapes, method, recipe, tokenizer, windows, reporter, timer)
    strategy: Strategy = Blockwise(run) if blockwise_applies(run) else FromStatistics(run)
    ranks = strategy.first_ranks(plan)
    for round_ in range(1, rounds + 1):  # importance rounds: reallocate, then compress again
        if round_ > 1:
            ranks = plan.reallocate(run.token_windows(), round_)  # Fisher of the model as is
            restore(model, dense_targets)
        if round_ == rounds and recipe.importance_measure:
            ranks = plan.measure(run.token_windows(), ranks)
        with reporter.task("factorizing", total=len(shapes)) as advance:
            with timer.phase(strategy.phase):
                loop = LayerLoop(model, method, recipe, reporter, ranks, advance)
                strategy.factorize(loop)

    reports = [loop.reports[n] for n in names]
    dense, _ = targeted_params(list(shapes.values()), ranks)
    kept = sum(report.kept_params for report in reports)  # sparse layers: values + indices
    reporter.log(
        f"targeted ratio: requested {recipe.ratio:.4f}, achieved {1 - kept / dense:.4f} "
        f"({recipe.allocation} allocation)"
    )
    for report in reports:
        report.est_loss = plan.estimated_loss(report.name, ranks[report.name])
    return Compressed(
        model, recipe, reports, params_before, count_parameters(model), dense, kept, timer.seconds
    )


def blockwise_applies(run: CalibrationRun) -> bool:
    """Whether each block is factorized as soon as its grams are complete.

    Sequential calibration needs it. A one-pass run takes it too when nothing needs every
    layer's statistics first (uniform ranks, grams only, no statistics file to write): memory
    then holds one block's grams instead of all of them (SmolLM2: 0.8 GB of float64).
    """
    model, names, method, recipe, reporter = (
        run.model,
        run.names,
        run.method,
        run.recipe,
        run.reporter,
    )
    if recipe.stats or "input_gram" not in method.needs:
        return False
    if not recipe.sequential and (recipe.allocation != "uniform" or method.needs != {"input_gram"}):
        return False
    if not in_one_block_list(model, names):
        reporter.log("targets are not all inside one list of blocks: one whole-model pass")
        return False
    return True


def compress_blockwise(
    model: nn.Module,
    names: list[str],
    shapes: dict[str, LayerShape],
    loop: LayerLoop,
    recipe: Recipe,
    windows: torch.Tensor,
) -> None:
    """Block by block: gather a block's statistics, then factorize it. Sequential: each block from
    the blocks before it compressed, and with `recipe.staged` group by group inside it
    (staged.py); else every block from the original model's inputs (one pass)."""

    def factorize(group_names: list[str], stats: dict[str, LayerStats]) -> None:
        for name in group_names:
            loop(shapes[name], stats[name])

    dtype = compute_dtype(recipe.calib_dtype)
    output_grams = loop.method.output_grams
    if recipe.sequential:
        staged.compress_sequential(
            model, names, windows, dtype, factorize, output_grams, staged=recipe.staged
        )
        return

    calibrate.collect_grams(
        model, names, windows, dtype, after_block=factorize, output_grams=output_grams
    )


@dataclass
class CalibrationRun:
    """What every calibration pass of one compression needs, carried together."""

    model: nn.Module
    names: list[str]
    shapes: dict[str, LayerShape]
    method: Method
    recipe: Recipe
    tokenizer: object | None
    windows: torch.Tensor | None  # (count, seq_len) token ids; cut from the recipe's text if None
    reporter: Reporter
    timer: Timer

    def token_windows(self) -> torch.Tensor:
        """The calibration windows, cut from the text the first time they are needed."""
        self.windows = resolve_windows(self.recipe, self.tokenizer, self.windows, self.reporter)
        return self.windows


class Strategy(Protocol):
    """How one compression gathers statistics and factorizes: ranks first, then every layer."""

    phase: str

    def first_ranks(self, plan: Plan) -> dict[str, int | None]: ...

    def factorize(self, loop: LayerLoop) -> None: ...


class Blockwise:
    """Each block factorized as soon as its statistics are complete (sequential by default)."""

    phase = "calibrate+factorize"

    def __init__(self, run: CalibrationRun) -> None:
        self.run = run

    def first_ranks(self, plan: Plan) -> dict[str, int | None]:
        return plan.ranks(windows=self.run.token_windows())

    def factorize(self, loop: LayerLoop) -> None:
        run = self.run
        compress_blockwise(run.model, run.names, run.shapes, loop, run.recipe, run.token_windows())


class FromStatistics:
    """Every layer's statistics gathered first (or read from a statistics file), then factorized:
    one pass, for methods and allocations that need all statistics before any rank."""

    phase = "factorize"

    def __init__(self, run: CalibrationRun) -> None:
        self.run = run
        self.stats: Statistics | None = None

    def first_ranks(self, plan: Plan) -> dict[str, int | None]:
        run = self.run
        fisher = {"output_fisher"} if needs_output_fisher(run.recipe) else set()
        with run.timer.phase("calibrate"):
            self.stats = gather_statistics(
                run.model, run.names, run.method.needs | fisher, run.recipe, run.tokenizer,
                run.windows, run.reporter, run.method.output_grams,
            )  # fmt: skip
        return plan.ranks(stats=self.stats)

    def factorize(self, loop: LayerLoop) -> None:
        assert self.stats is not None, "first_ranks gathers the statistics"
        for name in self.run.names:
            loop(self.run.shapes[name], self.stats.layers[name])
