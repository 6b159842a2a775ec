"""Plain truncated SVD: the data-free baseline (optimal in Frobenius norm of the weight)."""

from __future__ import annotations

import torch

from rankwise.methods.base import Factors, LayerStats, MethodOptions, split_singular


class SVD:
    name = "svd"
    needs: frozenset[str] = frozenset()
    output_grams = False

    def factorize(
        self, weight: torch.Tensor, stats: LayerStats, rank: int, options: MethodOptions
    ) -> Factors:
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # (out,k) (k,) (k,in)
        left, right = split_singular(u, s, vh, rank)
        return Factors(left.to(weight.dtype), right.to(weight.dtype), spectrum=s)

    def spectrum(
        self, weight: torch.Tensor, stats: LayerStats, options: MethodOptions
    ) -> torch.Tensor:
        return torch.linalg.svdvals(weight.float())
