"""Fisher-weighted SVD (Hsu et al. 2022, "Language model compression with weighted low-rank
factorization").

Rows (output units) whose weights move the loss more get a larger weight before the SVD, so the
truncation spends its error on rows the loss does not notice. The row weight is the square root of
the row-summed Fisher information (summed squared gradients on calibration text).
"""

from __future__ import annotations

import torch

from rankwise.core.errors import CalibrationError
from rankwise.methods.base import Factors, LayerStats, MethodOptions, split_singular


def row_weights(fisher: torch.Tensor, floor: float) -> torch.Tensor:
    """sqrt of each row's summed Fisher, floored relative to the largest so none is zero."""
    importance = fisher.double().sum(dim=1)  # (out,)
    top = importance.max().clamp_min(torch.finfo(torch.float64).tiny)
    return importance.clamp_min(floor * top).sqrt()  # (out,)


class FWSVD:
    name = "fwsvd"
    needs: frozenset[str] = frozenset({"fisher"})
    output_grams = False

    def factorize(
        self, weight: torch.Tensor, stats: LayerStats, rank: int, options: MethodOptions
    ) -> Factors:
        scaled = self._scaled(weight, stats, options)  # (out, in)
        weights = row_weights(stats.fisher, options.eig_floor)  # (out,)
        u, s, vh = torch.linalg.svd(scaled.float(), full_matrices=False)
        left, right = split_singular(u, s, vh, rank)  # (out, rank), (rank, in)
        left = left.double() / weights[:, None]  # fold the row weights back out
        dtype = weight.dtype
        return Factors(left.to(dtype), right.to(dtype), spectrum=s.float())

    def spectrum(
        self, weight: torch.Tensor, stats: LayerStats, options: MethodOptions
    ) -> torch.Tensor:
        return torch.linalg.svdvals(self._scaled(weight, stats, options).float())

    @staticmethod
    def _scaled(weight: torch.Tensor, stats: LayerStats, options: MethodOptions) -> torch.Tensor:
        if stats.fisher is None:
            raise CalibrationError("fwsvd needs calibration statistics (fisher)")
        weights = row_weights(stats.fisher, options.eig_floor)  # (out,)
        return weight.double() * weights[:, None]  # (out, in)
