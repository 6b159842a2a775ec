"""Truncate an already factorized model further, e.g. after recovery trained its factors.

Trained factors are no longer an SVD, so their product is re-factorized: with left = Ql Rl and
right^T = Qr Rr (thin QR), left @ right = Ql (Rl Rr^T) Qr^T, and the SVD of the small
(rank x rank) core gives the best lower-rank product at the cost of a rank x rank SVD, never
forming the dense (out x in) matrix. Every factorized layer keeps the same fraction of its rank,
so the allocation chosen at compression time keeps its shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from rankwise.core.errors import RatioError
from rankwise.methods.base import split_singular
from rankwise.model.accounting import LayerCount
from rankwise.model.layers import LowRankLinear, SparseLowRankLinear, factored_layer
from rankwise.model.modules import set_module
from rankwise.storage.manifest import LayerEntry


def product_core(
    left: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """left @ right = q_left @ core @ q_right^T with orthonormal q's: (q_left, core, q_right).

    The small (rank, rank) core has the product's singular values (used by the report too)."""
    q_left, r_left = torch.linalg.qr(left.double())  # (out, rank), (rank, rank)
    q_right, r_right = torch.linalg.qr(right.double().T)  # (in, rank), (rank, rank)
    return q_left, r_left @ r_right.T, q_right  # (out, rank), (rank, rank), (in, rank)


def product_svd(
    left: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of left @ right (out, rank) @ (rank, in) through the factors' QR: (u, s, vh)."""
    q_left, core, q_right = product_core(left, right)
    u_core, s, vh_core = torch.linalg.svd(core)  # (rank, rank) each, s (rank,)
    return q_left @ u_core, s, vh_core @ q_right.T  # (out, rank), (rank,), (rank, in)


def truncate_factors(
    left: torch.Tensor, right: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of left @ right, and the relative weight error of dropping."""
    u, s, vh = product_svd(left, right)
    new_left, new_right = split_singular(u, s, vh, rank)  # (out, rank), (rank, in)
    energy = s.square()
    error = float((energy[rank:].sum() / energy.sum().clamp_min(1e-300)).sqrt())
    return new_left.to(left.dtype), new_right.to(right.dtype), error


def fixed_params(entries: Mapping[str, LayerEntry], layers: Mapping[str, LowRankLinear]) -> int:
    """Kept parameters truncation does not change: layers kept dense, and the values and indices
    of sparse residuals (which are kept as they are)."""
    dense = sum(e.count.kept_params for name, e in entries.items() if name not in layers)
    residuals = sum(
        LayerCount(m.out_features, m.in_features, 0, m.nnz).kept_params
        for m in layers.values()
        if isinstance(m, SparseLowRankLinear)
    )
    return dense + residuals


def proportional_ranks(
    layers: dict[str, LowRankLinear], dense_params: int, kept_dense_layers: int, ratio: float
) -> dict[str, int]:
    """New ranks, each layer's rank times one factor, so the targeted layers lose `ratio` of
    their dense parameters (`dense_params`); `kept_dense_layers` parameters (dense layers,
    sparse residuals: `fixed_params`) stay as they are."""
    if not layers:  # e.g. a portable modular model: narrowed MLPs are plain dense layers
        raise RatioError(
            "the model has no factorized layers to truncate (narrowed MLP layers have no rank "
            "to cut: compress the source again at the higher ratio)"
        )
    factor_params = sum(m.rank * (m.in_features + m.out_features) for m in layers.values())
    budget = (1.0 - ratio) * dense_params - kept_dense_layers
    scale = budget / max(factor_params, 1)
    if scale >= 1.0:
        raise RatioError(
            f"ratio {ratio} removes no more than the model already does "
            f"({1 - (factor_params + kept_dense_layers) / dense_params:.4f})"
        )
    if scale <= 0:
        raise RatioError(f"ratio {ratio} leaves no parameters for the factorized layers")
    return {name: max(1, math.floor(m.rank * scale)) for name, m in layers.items()}


def truncate_model(model: nn.Module, ranks: dict[str, int]) -> dict[str, float]:
    """Replace each named LowRankLinear by its truncation (in place); relative errors by name.

    A SparseLowRankLinear keeps its sparse residual unchanged: only its low-rank part is cut
    (the error reported is that part's, in the weight metric)."""
    errors = {}
    for name, rank in ranks.items():
        module = model.get_submodule(name)
        left, right, errors[name] = truncate_factors(
            module.left.detach(), module.right.detach(), rank
        )
        bias = module.bias.detach() if module.bias is not None else None
        sparse = module.csr() if isinstance(module, SparseLowRankLinear) else None
        set_module(model, name, factored_layer(left, right, sparse, bias))
    return errors
