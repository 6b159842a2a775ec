"""The layer loop: each target replaced by its factors, one log line and one manifest entry
per layer. The math runs on the run's device; the factors come back to the model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rankwise.calibration.run import CalibrationRun
from rankwise.core import parallel
from rankwise.methods import Factors, LayerStats, Method, MethodOptions
from rankwise.model.layers import factored_layer
from rankwise.model.modules import as_linear, set_module
from rankwise.pipeline.sharing import owners_by_cost, share
from rankwise.storage.manifest import LayerEntry


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
    """One target's factors (the model unchanged). The math runs on `device` (where the
    statistics are); the factors come back to where the model's weight is."""
    module = as_linear(model.get_submodule(name))
    home = module.weight.device
    weight = module.weight.detach().to(device or home)
    return method.factorize(weight, stats, rank, options).to(home)


def install(model: nn.Module, name: str, factors: Factors) -> None:
    """Replace one target by its factors (in place)."""
    module = as_linear(model.get_submodule(name))
    bias = module.bias.detach() if module.bias is not None else None
    # Block-by-block runs factorize inside the calibration's inference_mode: the layer's own
    # tensors are made outside it, or recovery could not train them (inference tensors never
    # join autograd).
    with torch.inference_mode(False):
        layer = factored_layer(factors.left, factors.right, factors.sparse, bias)
    set_module(model, name, layer)


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
    """Factorizes layers, logging a line per layer and keeping their manifest entries.

    Under torchrun each layer of a group is factorized by one owner rank (chosen by cost) and
    its factors broadcast, so every rank installs the same layers (core/parallel.py)."""

    def __init__(
        self, run: CalibrationRun, ranks: dict[str, int | None], advance: Callable[[int], None]
    ) -> None:
        self.run, self.ranks, self.advance = run, ranks, advance
        self.entries: dict[str, LayerEntry] = {}

    def __call__(self, name: str, stats: LayerStats) -> None:
        self.group([name], {name: stats})

    def group(self, names: list[str], stats: dict[str, LayerStats]) -> None:
        """Factorize and install `names` (a group whose statistics are complete)."""
        here = parallel.world()
        if here.size == 1:  # one layer at a time: its factors are installed before the next
            for name in names:
                rank = self.ranks[name]
                self.install(name, None if rank is None else self.factorize(name, stats[name]))
            return
        owners = owners_by_cost(
            [self.run.shapes[n] for n in names if self.ranks[n] is not None], here.size
        )
        computed = {n: self.factorize(n, stats[n]) for n, r in owners.items() if r == here.rank}
        for name in names:
            factors = None
            if name in owners:
                factors = computed.get(name)
                if here.size > 1:
                    factors = share(factors, owners[name], self.run.shapes[name], self.run.device)
            self.install(name, factors)

    def factorize(self, name: str, stats: LayerStats) -> Factors:
        run, rank = self.run, self.ranks[name]
        assert rank is not None, "dense layers are not factorized"
        on_device = stats_on(run, stats)
        return factorize_layer(
            run.model, name, rank, run.method, on_device, run.options, run.device
        )

    def install(self, name: str, factors: Factors | None) -> None:
        """Put the factors in place (None: the layer stays dense); log and record the layer."""
        run, shape = self.run, self.run.shapes[name]
        bias = as_linear(run.model.get_submodule(name)).bias is not None
        rank, error, nnz, rounds_ = None, 0.0, 0, ""
        if factors is not None:
            install(run.model, name, factors)
            rank = factors.left.shape[1]  # a sparse residual spends part of the rank's budget
            error = factors.rel_error
            if error is None:
                error = relative_error(factors.spectrum, rank)
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
