"""Orchestration: targets -> statistics -> ranks -> factors -> LowRankLinear, with accounting.

The math lives in `methods/`; this module owns the loop, the checks, the timing and the
per-layer log line (name, shape, rank kept, relative error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankwise import calibrate
from rankwise.allocate import LayerShape, allocate_uniform, targeted_params
from rankwise.blockwise import in_one_block_list
from rankwise.calibrate import Statistics
from rankwise.data import calibration_windows
from rankwise.errors import CalibrationError, NonFiniteWeightsError
from rankwise.layers import LowRankLinear
from rankwise.methods import Factors, LayerStats, Method, MethodOptions, get_method
from rankwise.models import as_linear, find_targets, linear_weight, set_module
from rankwise.progress import Reporter, Timer
from rankwise.recipe import Recipe


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: kept dense
    rel_error: float  # sqrt(dropped / total energy) of the method's spectrum; 0 when dense

    @property
    def kept_fraction(self) -> float:
        if self.rank is None:
            return 1.0
        return (
            self.rank
            * (self.out_features + self.in_features)
            / (self.out_features * self.in_features)
        )


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


def count_parameters(model: nn.Module) -> int:
    """Unique parameters: tied weights (embedding = LM head) are counted once."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel()
    return total


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
    set_module(model, name, LowRankLinear.from_factors(factors.left, factors.right, bias))
    return factors


def gather_statistics(
    model: nn.Module,
    names: list[str],
    method: Method,
    recipe: Recipe,
    tokenizer: object | None,
    windows: torch.Tensor | None,
    reporter: Reporter,
) -> Statistics:
    """Load reusable statistics (recipe.stats) if they hold what the method needs, else gather."""
    if not method.needs:
        return Statistics({n: LayerStats() for n in names})
    if recipe.stats and Path(recipe.stats).is_file():
        stats = Statistics.load(recipe.stats)
        if stats.has(method.needs, names):
            reporter.log(f"statistics reused from {recipe.stats}")
            return stats
    windows = resolve_windows(recipe, tokenizer, windows, reporter)
    dtype = getattr(torch, recipe.calib_dtype)
    total = calibrate.count_blocks(model, names) * ("input_gram" in method.needs) + len(windows) * (
        "fisher" in method.needs
    )
    with reporter.task("calibrating", total=total) as advance:
        stats = calibrate.collect(model, names, windows, method.needs, dtype, advance)
    if recipe.stats:
        stats.save(recipe.stats)
        reporter.log(f"statistics saved to {recipe.stats}")
    return stats


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
            f"calibration text gives {len(windows)} windows of {recipe.seq_len} tokens "
            f"(asked {recipe.samples})"
        )
    return windows


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
        error = 0.0
        if rank is not None:
            factors = factorize_layer(
                self.model, shape.name, rank, self.method, stats, self.options
            )
            error = relative_error(factors.spectrum, rank)
        self.reports[shape.name] = LayerReport(
            shape.name, shape.out_features, shape.in_features, rank, error
        )
        kept = "dense" if rank is None else f"rank {rank:>4}"
        self.reporter.log(
            f"{shape.name:<40} {shape.out_features:>5}x{shape.in_features:<5} "
            f"{kept}  rel.err {error:.4f}"
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
    timer = Timer()
    model.eval()
    names = find_targets(model, recipe.targets, recipe.ignore)
    check_finite(model, names)
    method = get_method(recipe.method)
    params_before = count_parameters(model)
    shapes = {n: LayerShape(n, *linear_weight(model.get_submodule(n)).shape) for n in names}
    with timer.phase("allocate"):
        ranks = allocate_uniform(list(shapes.values()), recipe.ratio, recipe.overrides)

    with reporter.task("factorizing", total=len(shapes)) as advance:
        loop = LayerLoop(model, method, recipe, reporter, ranks, advance)
        if sequential_applies(model, names, method, recipe, reporter):
            with timer.phase("calibrate+factorize"):
                windows = resolve_windows(recipe, tokenizer, windows, reporter)
                compress_sequential(model, names, shapes, loop, recipe, windows)
        else:
            with timer.phase("calibrate"):
                stats = gather_statistics(
                    model, names, method, recipe, tokenizer, windows, reporter
                )
            with timer.phase("factorize"):
                for name in names:
                    loop(shapes[name], stats.layers[name])

    dense, kept = targeted_params(list(shapes.values()), ranks)
    reports = [loop.reports[n] for n in names]
    return Compressed(
        model, recipe, reports, params_before, count_parameters(model), dense, kept, timer.seconds
    )


def sequential_applies(
    model: nn.Module, names: list[str], method: Method, recipe: Recipe, reporter: Reporter
) -> bool:
    """Sequential calibration needs grams, fresh statistics, and targets inside the blocks."""
    if not (recipe.sequential and not recipe.stats and "input_gram" in method.needs):
        return False
    if not in_one_block_list(model, names):
        reporter.log("targets are not all inside one list of blocks: one whole-model pass")
        return False
    return True


def compress_sequential(
    model: nn.Module,
    names: list[str],
    shapes: dict[str, LayerShape],
    loop: LayerLoop,
    recipe: Recipe,
    windows: torch.Tensor,
) -> None:
    """Block by block: gather a block's statistics on the compressed prefix, then factorize it."""

    def after_block(block_names: list[str], block_stats: dict[str, LayerStats]) -> bool:
        for name in block_names:
            loop(shapes[name], block_stats[name])
        return True

    dtype = getattr(torch, recipe.calib_dtype)
    calibrate.collect_grams(model, names, windows, dtype, after_block=after_block)
