"""Perplexity under the protocol of DESIGN.md §7, and size figures.

perplexity = exp(mean NLL over every predicted token). Windows are scored in fp32; a NaN in any
window makes the result NaN: nothing is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.progress import Advance


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens counted
    windows: int


def window_nll(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each window's predicted tokens (batch,), in float64."""
    logits = model(input_ids=batch, use_cache=False).logits  # (batch, seq, vocab)
    targets = batch[:, 1:]  # (batch, seq-1)
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, reduction="none"
    )  # (batch, seq-1)
    return nll.double().sum(dim=1)


def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, advance: Advance | None = None
) -> Perplexity:
    """Perplexity of a causal LM on token windows (count, seq_len)."""
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            total += float(window_nll(model, batch).sum())
            if advance:
                advance(len(batch))
    tokens = len(windows) * (windows.shape[1] - 1)
    mean = total / tokens
    return Perplexity(
        math.exp(mean) if math.isfinite(mean) else float("nan"), mean, tokens, len(windows)
    )
