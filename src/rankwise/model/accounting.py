"""Parameter accounting, the one owner of every count and ratio rankwise reports.

Definitions (docs/evaluation.md):
- a layer's kept weight parameters: `out * in` when dense; `rank * (out + in)` for factors, plus
  a sparse residual's values and indices in parameter-equivalents (bytes / 4);
- targeted ratio = 1 - kept / dense over the targeted layers (biases excluded: unchanged);
- model ratio = 1 - parameters after / parameters before, over the whole model (a tied
  embedding / head counted once, a sparse layer's index buffers counted as parameters).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from rankwise.model.csr import csr_params
from rankwise.model.layers import SparseLowRankLinear


@dataclass(frozen=True)
class LayerShape:
    """A targeted linear's name and shape: what a rank costs and where it stops saving."""

    name: str
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def factor_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    @property
    def break_even_rank(self) -> float:
        """out*in/(out+in): at or above this rank the factors cost as much as the dense matrix."""
        return self.dense_params / (self.out_features + self.in_features)


@dataclass(frozen=True)
class LayerCount:
    """One targeted layer as compressed: dense (rank None), or factors with `nnz` residual;
    `kept_out` / `kept_in`: the width a modular run narrowed it to (None: the dense width)."""

    out_features: int
    in_features: int
    rank: int | None
    nnz: int = 0
    kept_out: int | None = None
    kept_in: int | None = None

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def kept_params(self) -> int:
        """Weight parameters kept; a sparse residual counts its values and indices, a narrowed
        layer its narrower shape."""
        out = self.out_features if self.kept_out is None else self.kept_out
        inp = self.in_features if self.kept_in is None else self.kept_in
        if self.rank is None:
            return out * inp
        factors = self.rank * (out + inp)
        residual = csr_params(self.nnz, out, inp) if self.nnz else 0
        return factors + residual

    @property
    def kept_fraction(self) -> float:
        return self.kept_params / self.dense_params


def targeted_totals(layers: Iterable[LayerCount]) -> tuple[int, int]:
    """(dense, kept) weight parameters over the targeted layers."""
    layers = list(layers)
    return sum(c.dense_params for c in layers), sum(c.kept_params for c in layers)


def targeted_ratio(layers: Iterable[LayerCount]) -> float:
    dense, kept = targeted_totals(layers)
    return 1.0 - kept / dense if dense else 0.0


def count_parameters(model: nn.Module) -> int:
    """Parameters of the whole model, shared tensors once; a sparse residual's index buffers
    count as parameter-equivalents, so the model ratio sees what the targeted ratio sees."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel()
    for module in model.modules():
        if isinstance(module, SparseLowRankLinear):
            total += module.index_params()
    return total


def fp32_bytes(params: int) -> int:
    """Bytes of `params` parameters stored in fp32: a source that is no directory on disk."""
    return params * 4


def model_ratio(params_before: int, params_after: int) -> float:
    return 1.0 - params_after / params_before if params_before else 0.0
