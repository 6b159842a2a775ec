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

from rankwise.core.progress import Advance


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens counted
    windows: int


# positions whose logits exist at once: 512 x 49,152 words x 4 bytes = 100 MB for SmolLM2
LOGIT_CHUNK = 512


def _head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None] | None:
    """(decoder body, LM head, logit soft-cap) when the model is body -> head -> optional
    soft-cap, as every built-in causal LM family is; None for anything else (then the model's
    own forward computes all logits at once)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, nn.Module) or not isinstance(body, nn.Module) or body is model:
        return None
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return body, head, softcap


def _chunk_nll(
    head: nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Summed NLL (float64) of `targets` (positions,) from `hidden` (positions, width)."""
    logits = head(hidden).float()  # (positions, vocab)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    nll = F.cross_entropy(logits, targets, reduction="none")  # (positions,)
    return nll.double().sum()


def window_nll(model: nn.Module, batch: torch.Tensor, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """Summed NLL of each window's predicted tokens (batch,), in float64.

    The body runs once on the batch; the LM head then scores `chunk` positions at a time, so the
    full (batch, seq, vocab) logits never exist (400 MB for 4 SmolLM2 windows, whose copies and
    transposed cross-entropy made evaluation cost ~1.5x its forwards: bench/results/hardware.md).
    """
    parts = _head(model)
    if parts is None:
        logits = model(input_ids=batch, use_cache=False).logits  # (batch, seq, vocab)
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none"
        )
        return nll.double().sum(dim=1)
    body, head, softcap = parts
    hidden = body(input_ids=batch, use_cache=False)[0]  # (batch, seq, width)
    sums = torch.zeros(len(batch), dtype=torch.float64)
    for row in range(len(batch)):
        for start in range(0, batch.shape[1] - 1, chunk):
            stop = min(start + chunk, batch.shape[1] - 1)
            targets = batch[row, start + 1 : stop + 1]  # (positions,)
            sums[row] += _chunk_nll(head, softcap, hidden[row, start:stop], targets)
    return sums


def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, advance: Advance | None = None
) -> Perplexity:
    """Perplexity of a causal LM on token windows (count, seq_len), computed where the model
    is (batches are moved to its device)."""
    total = 0.0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            total += float(window_nll(model, batch).sum())
            if advance:
                advance(len(batch))
    tokens = len(windows) * (windows.shape[1] - 1)
    mean = total / tokens
    return Perplexity(
        math.exp(mean) if math.isfinite(mean) else float("nan"), mean, tokens, len(windows)
    )
