"""`--method modular`: MLPs narrowed to k channels, attention factorized by whiten, one budget.

The math is methods/modular.py (channel selection, least-squares refit, width curves); the
narrowed modules are model/narrow.py's; this module plans the widths and ranks and runs the
calibration that fits them, block by block.

- **Plan.** `portable`: attention stays dense and every MLP keeps the same width k, the one the
  budget allows (then `intermediate_size = k` in the config: a plain checkpoint). `uniform`: every
  MLP keeps (1 - ratio) of its channels, every attention target (1 - ratio) of its parameters as
  whiten factors. `importance` (the default, "hybrid"): one greedy (allocation/widths.py) over
  every attention layer's whiten rank curve and every MLP's width curve, both turned into
  estimated loss by the output Fisher (allocation/importance.py's estimator), measured on the
  dense model's importance windows.
- **Fit.** Sequential by default (calibration/staged.py): block k's grams come from the model
  whose blocks before k are compressed; inside a block q/k/v, then o, then the MLP, whose down
  projection's input gram (the channels' correlation C) is taken from the dense gate/up on the
  compressed attention's outputs. `sequential=False`: every block from the dense model's inputs.
- **Budget.** `ratio` is the fraction of the targeted layers' weight parameters removed, counted
  by model/accounting.py on the narrowed shapes; widths and ranks are rounded down, so at least
  the ratio is removed (portable: within one channel per MLP of it).

compress() (pipeline/compress.py) dispatches here and wraps the result, so this module returns
the fields of its `Compressed` rather than importing it (that import would be a cycle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.allocation.budget import allocate_uniform
from rankwise.allocation.importance import layer_gains
from rankwise.allocation.plan import allocation_possible, needs_output_fisher
from rankwise.allocation.widths import StepCurve, rank_curve, spend, width_curve
from rankwise.calibration import staged
from rankwise.calibration import statistics as calibrate
from rankwise.calibration.run import CalibrationRun
from rankwise.core.errors import (
    CalibrationError,
    NonFiniteWeightsError,
    RatioError,
    RecipeError,
)
from rankwise.core.progress import Reporter, Timer
from rankwise.core.recipe import Recipe
from rankwise.methods import LayerStats, get_method
from rankwise.methods.modular import channel_order, select_channels, width_gains
from rankwise.model.accounting import LayerShape, count_parameters
from rankwise.model.layers import factored_layer
from rankwise.model.modules import as_linear, linear_weight, set_module
from rankwise.model.narrow import MLPGroup, keep_outputs, mlp_groups, set_mlp_width, with_inputs
from rankwise.model.targets import find_targets
from rankwise.storage.manifest import LayerEntry


@dataclass
class ModularPlan:
    """Widths per MLP (by its down projection's name; None: kept dense), ranks per other target
    (None: dense), and the curves they were chosen from (importance only)."""

    widths: dict[str, int | None]
    ranks: dict[str, int | None]
    curves: dict[str, StepCurve] = field(default_factory=dict)

    def estimated_loss(self, name: str, steps: int | None) -> float | None:
        curve = self.curves.get(name)
        return None if curve is None else curve.loss(steps)


def channel_params(model: nn.Module, group: MLPGroup) -> int:
    """Weight parameters one intermediate channel costs: its rows of the expanding linears and
    its column of the down projection."""
    rows = sum(linear_weight(model.get_submodule(n)).shape[1] for n in group.expand)
    return rows + linear_weight(model.get_submodule(group.down)).shape[0]


def d_ff(model: nn.Module, group: MLPGroup) -> int:
    return linear_weight(model.get_submodule(group.down)).shape[1]


def portable_width(run: CalibrationRun, groups: list[MLPGroup]) -> int:
    """The one MLP width that removes `ratio` of the targeted parameters, attention dense."""
    model = run.model
    widths = {d_ff(model, g) for g in groups}
    costs = {channel_params(model, g) for g in groups}
    mlp_names = {n for g in groups for n in g.names}
    every = {n for g in mlp_groups(model, find_targets(model)) for n in g.names}
    if len(widths) != 1 or len(costs) != 1 or every - mlp_names:
        raise RecipeError("portable needs every MLP of the model targeted, all of one width")
    (full,), (cost,) = widths, costs
    dense = sum(s.dense_params for s in run.shapes.values())
    drop = math.ceil(run.recipe.ratio * dense / (cost * len(groups)))
    if drop >= full:
        share = cost * full * len(groups) / dense
        raise RatioError(
            f"ratio {run.recipe.ratio} cannot be met by MLP width alone with attention dense: "
            f"the MLPs hold {share:.0%} of the targeted parameters"
        )
    return full - drop


def attention_names(run: CalibrationRun) -> set[str]:
    """Targets that are not in an MLP group (attention, in the built-in lists)."""
    return set(run.names) - {n for g in mlp_groups(run.model, run.names) for n in g.names}


def plan_modular(run: CalibrationRun, groups: list[MLPGroup]) -> ModularPlan:
    """Widths and ranks under the recipe's budget (see the module docstring)."""
    recipe, model = run.recipe, run.model
    others = [n for n in run.names if n in attention_names(run)]
    if recipe.portable:
        width = portable_width(run, groups)
        return ModularPlan({g.down: width for g in groups}, dict.fromkeys(others))
    if recipe.allocation == "uniform":
        ranks = allocate_uniform([run.shapes[n] for n in others], recipe.ratio, recipe.overrides)
        widths = {g.down: max(1, int((1 - recipe.ratio) * d_ff(model, g))) for g in groups}
        return ModularPlan(widths, ranks)
    curves = measure_curves(run, groups, others)
    budget = (1.0 - recipe.ratio) * sum(s.dense_params for s in run.shapes.values())
    with run.timer.phase("allocate"):
        steps = spend(list(curves.values()), budget)
    widths = {g.down: steps[g.down] for g in groups}
    return ModularPlan(widths, {n: steps[n] for n in others}, curves)


def measure_curves(
    run: CalibrationRun, groups: list[MLPGroup], others: list[str]
) -> dict[str, StepCurve]:
    """Every attention target's whiten rank curve and every MLP's width curve, as estimated loss
    (spectra and channel gains on the dense model's importance windows, times the mean output
    Fisher of the layer, or of the MLP's down projection, as `importance_estimator` says)."""
    model, windows = run.model, run.importance_windows()
    downs = {g.down: g for g in groups}
    energies: dict[str, torch.Tensor] = {}  # name -> (n,) squared spectrum / channel gains

    def after_block(names: list[str], stats: dict[str, LayerStats]) -> None:
        for name in names:
            weight = linear_weight(model.get_submodule(name))
            layer = stats[name]
            device = layer.input_gram.device if layer.input_gram is not None else weight.device
            weight = weight.to(device)
            if name in downs:
                gram = layer.input_gram
                order = channel_order(gram, weight)
                energies[name] = width_gains(gram, weight, order).cpu()
            elif name in others:
                spectrum = run.method.spectrum(weight, layer, run.options)
                energies[name] = spectrum.double().square().cpu()

    fisher_of = list(others) + list(downs)
    want_fisher = needs_output_fisher(run.recipe)
    blocks = calibrate.count_blocks(model, run.names)
    with run.reporter.task("importance", total=blocks + len(windows) * want_fisher) as advance:
        with run.timer.phase("importance curves"):
            calibrate.collect_grams(
                model, run.names, windows, run.dtype, advance, after_block=after_block,
                output_grams=False, device=run.device,
            )  # fmt: skip
        fisher: dict[str, torch.Tensor | None] = dict.fromkeys(fisher_of)
        if want_fisher:
            with run.timer.phase("importance fisher"):
                fisher.update(
                    calibrate.collect_output_fisher(
                        model, fisher_of, windows, run.dtype, advance, device=run.device
                    )
                )
    estimator = run.recipe.importance_estimator
    curves: dict[str, StepCurve] = {}
    for name in fisher_of:
        gains = layer_gains(energies[name].sqrt(), fisher[name], estimator)
        if name in downs:
            curves[name] = width_curve(name, gains, channel_params(model, downs[name]))
        else:
            shape = run.shapes[name]
            curves[name] = rank_curve(name, gains, shape.out_features, shape.in_features)
    return curves


class Narrower:
    """The callback of block-by-block calibration: factorizes a group's attention targets and
    narrows its MLPs (whose down projection's input gram is complete), one entry per target."""

    def __init__(self, run: CalibrationRun, groups: list[MLPGroup], plan: ModularPlan) -> None:
        self.run, self.plan = run, plan
        self.by_down = {g.down: g for g in groups}
        self.in_mlp = {n for g in groups for n in g.expand}
        self.entries: dict[str, LayerEntry] = {}
        self.advance = lambda _: None

    def __call__(self, names: list[str], stats: dict[str, LayerStats]) -> None:
        for name in names:
            if name in self.by_down:
                group = self.by_down[name]
                if not set(group.expand) <= set(names):  # their rows must change with it
                    raise CalibrationError(f"{name} was calibrated apart from {group.expand[0]}")
                self.narrow(group, stats[name])
            elif name not in self.in_mlp:
                self.factorize(name, stats[name])

    def factorize(self, name: str, stats: LayerStats) -> None:
        """Whiten factors at the planned rank (None: the target stays dense)."""
        run, shape, rank = self.run, self.run.shapes[name], self.plan.ranks[name]
        module = as_linear(run.model.get_submodule(name))
        bias = module.bias.detach() if module.bias is not None else None
        error = 0.0
        if rank is not None:
            gram = stats.input_gram
            weight = module.weight.detach()
            home = weight.device
            if gram is not None:
                weight = weight.to(gram.device)
            factors = run.method.factorize(weight, stats, rank, run.options)
            energy = factors.spectrum.double().square()
            error = float((energy[rank:].sum() / energy.sum().clamp_min(1e-300)).sqrt())
            with torch.inference_mode(False):  # recovery must be able to train them
                layer = factored_layer(factors.left.to(home), factors.right.to(home), None, bias)
            set_module(run.model, name, layer)
        self.entries[name] = LayerEntry(
            name=name, out_features=shape.out_features, in_features=shape.in_features,
            rank=rank, bias=bias is not None, rel_error=error,
            est_loss=self.plan.estimated_loss(name, rank),
        )  # fmt: skip
        kept = "dense" if rank is None else f"rank {rank:>4}"
        run.reporter.log(
            f"{name:<40} {shape.out_features:>5}x{shape.in_features:<5} {kept}  rel.err {error:.4f}"
        )
        self.advance(1)

    def narrow(self, group: MLPGroup, stats: LayerStats) -> None:
        """Keep the planned width of the MLP's channels; refit its down projection."""
        run, model = self.run, self.run.model
        width = self.plan.widths[group.down]
        full = d_ff(model, group)
        error = 0.0
        if width is not None and width < full:
            down = model.get_submodule(group.down)
            weight = linear_weight(down)  # (out, d_ff)
            gram = stats.input_gram
            if gram is None:
                raise CalibrationError(f"no input gram reached {group.down}")
            chosen = select_channels(gram, weight.to(gram.device), width)
            kept, refitted = chosen.kept.cpu(), chosen.down.to(weight.device)
            with torch.inference_mode(False):
                for name in group.expand:
                    set_module(model, name, keep_outputs(model.get_submodule(name), kept))
                set_module(model, group.down, with_inputs(down, refitted))
            error = chosen.rel_error
        for name in group.names:
            shape = run.shapes[name]
            narrowed = width is not None and width < full
            self.entries[name] = LayerEntry(
                name=name, out_features=shape.out_features, in_features=shape.in_features,
                rank=None, bias=getattr(model.get_submodule(name), "bias", None) is not None,
                rel_error=error if name == group.down else None,
                est_loss=self.plan.estimated_loss(name, width) if name == group.down else None,
                kept_out=width if narrowed and name != group.down else None,
                kept_in=width if narrowed and name == group.down else None,
            )  # fmt: skip
        prefix = group.down.rpartition(".")[0] or group.down
        kept_line = "dense" if width is None else f"width {width:>5}/{full}"
        run.reporter.log(f"{prefix:<40} mlp {kept_line}  rel.err {error:.4f}")
        self.advance(1)


def check_finite(model: nn.Module, names: list[str]) -> None:
    for name in names:
        if not torch.isfinite(linear_weight(model.get_submodule(name))).all():
            raise NonFiniteWeightsError(f"weight of {name} holds NaN or Inf; refusing to compress")


def compress_modular(
    model: nn.Module,
    recipe: Recipe,
    tokenizer: object | None = None,
    windows: torch.Tensor | None = None,
    reporter: Reporter | None = None,
) -> dict[str, object]:
    """Compress `model` in place by modular decomposition; the fields of a `Compressed`.

    Called by compress(), which has resolved the recipe's dtypes and device."""
    if recipe.method != "modular":
        raise RecipeError(f"portable needs --method modular (got '{recipe.method}')")
    reporter = reporter or Reporter()
    model.eval()
    names = find_targets(model, recipe.targets, recipe.ignore)
    check_finite(model, names)
    groups = mlp_groups(model, names)
    if not groups:
        raise RecipeError("modular: no MLP (its expanding and down projections) among the targets")
    method = get_method("modular")
    recipe = allocation_possible(model, method, recipe, tokenizer, windows, reporter)
    params_before = count_parameters(model)
    shapes = {n: LayerShape(n, *linear_weight(model.get_submodule(n)).shape) for n in names}
    run = CalibrationRun(
        model, names, shapes, method, recipe, tokenizer, windows, reporter, Timer()
    )
    plan = plan_modular(run, groups)
    narrower = Narrower(run, groups, plan)
    # targets that stay dense need no statistics (portable: attention is not calibrated at all)
    fitted = [n for n in names if n in narrower.in_mlp or n in narrower.by_down or plan.ranks[n]]
    for name in names:
        if name not in fitted:
            narrower.factorize(name, LayerStats())
    steps = len(groups) + len(fitted) - len(narrower.in_mlp) - len(groups)
    with reporter.task("compressing", total=steps) as advance, run.timer.phase("calibrate+narrow"):
        narrower.advance = advance
        if recipe.sequential:
            staged.compress_sequential(
                model, fitted, run.token_windows(), run.dtype, narrower, output_grams=False,
                staged=recipe.staged, device=run.device,
            )  # fmt: skip
        else:
            calibrate.collect_grams(
                model, fitted, run.token_windows(), run.dtype, after_block=narrower,
                output_grams=False, device=run.device,
            )  # fmt: skip
    if recipe.portable:
        set_mlp_width(model.config, next(iter(plan.widths.values())))
    layers = [narrower.entries[n] for n in names]
    dense = sum(s.dense_params for s in shapes.values())
    kept = sum(layer.count.kept_params for layer in layers)
    kind = "portable" if recipe.portable else f"{recipe.allocation} allocation"
    reporter.log(
        f"targeted ratio: requested {recipe.ratio:.4f}, achieved {1 - kept / dense:.4f} ({kind})"
    )
    return {
        "model": model, "recipe": recipe, "layers": layers,
        "model_params_before": params_before, "model_params_after": count_parameters(model),
        "targeted_before": dense, "targeted_after": kept, "seconds": run.timer.seconds,
    }  # fmt: skip
