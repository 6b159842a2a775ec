"""LowRankLinear: an nn.Linear stored as two factors, in -> rank -> out.

It keeps the Linear's interface (`in_features`, `out_features`, a `weight` that rebuilds the dense
matrix, `merge()` back to nn.Linear) so code that inspects linears keeps working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def saves_parameters(rank: int, out_features: int, in_features: int) -> bool:
    """A rank-r factorization costs r*(out+in); it pays only below out*in/(out+in)."""
    return rank * (out_features + in_features) < out_features * in_features


class LowRankLinear(nn.Module):
    """y = left @ (right @ x) + bias, with left (out, rank) and right (rank, in)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.right = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))  # (rank, in)
        self.left = nn.Parameter(torch.empty(out_features, rank, dtype=dtype))  # (out, rank)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(
        cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        out_features, rank = left.shape
        layer = cls(right.shape[1], out_features, rank, bias=bias is not None, dtype=left.dtype)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two GEMMs and nothing else: F.linear views (..., in) as 2-D and hands the transposed
        # factor to BLAS as a flag, so no operand is copied (profiled: mm, then mm/addmm).
        hidden = F.linear(x, self.right)  # (..., rank)
        return F.linear(hidden, self.left, self.bias)  # (..., out)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) matrix the factors represent."""
        return self.left @ self.right

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def merge(self) -> nn.Linear:
        """Back to a plain nn.Linear holding left @ right."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, dtype=self.left.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )
