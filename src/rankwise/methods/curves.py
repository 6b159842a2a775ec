"""Loss-vs-rank curves corrected by a few measurements (sparse fits, measured losses)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def rescale_tails(
    gains: torch.Tensor, ranks: Sequence[float], log_scales: Sequence[float]
) -> torch.Tensor:
    """Gains (k,) whose tails, the loss of truncating at each rank, are those of `gains` times
    exp(log-scale), the log-scale linear in rank between `ranks` and held beyond them. How a
    curve is corrected by a few measurements (sparse fits, measured losses). float64, >= 0."""
    energy = gains.double()  # (k,)
    tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # (k+1,)
    at = np.arange(len(tails), dtype=np.float64)
    knots = np.asarray(ranks, dtype=np.float64)
    scale = np.exp(np.interp(at, knots, np.asarray(log_scales, dtype=np.float64)))
    scaled = tails * torch.from_numpy(scale)  # (k+1,)
    return (scaled[:-1] - scaled[1:]).clamp_min(0.0)  # (k,)
