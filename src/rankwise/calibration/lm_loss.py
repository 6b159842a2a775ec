"""A causal LM's summed next-token loss from its last block's output, a slice at a time.

Why slices. A causal LM's forward makes all (batch, seq, vocab) logits in float32 before its loss:
100 MB per 512-token window on SmolLM2 (49k vocabulary), 537 MB on Gemma 3 (262k), and the loss's
backward holds as much again. Running final norm + head + loss (+ backward) on a slice of
positions at a time keeps one slice's logits alive; the gradient that reaches the blocks is the
same. The head is rebuilt from the model's parts (final norm, LM head, logit soft-cap), so
`reproduces_loss` checks it against the model's own loss before a run relies on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.errors import CalibrationError

SLICE_ROWS = 128  # positions x windows per slice: 25 MB of float32 logits at a 49k vocabulary


def has_lm_head(model: nn.Module) -> bool:
    """A loss to differentiate: the model predicts tokens (not a bare encoder)."""
    return getattr(model, "get_output_embeddings", lambda: None)() is not None


@dataclass
class Head:
    """What turns the last block's output into logits: final norm, LM head, soft-cap."""

    norm: nn.Module
    head: nn.Module
    softcap: float | None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) last-block output -> (..., vocab) float32 logits."""
        logits = self.head(self.norm(hidden)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def final_head(model: nn.Module) -> Head:
    """The final norm, LM head and soft-cap of a decoder whose blocks sit in one list."""
    base = getattr(model, "base_model", model)
    norm = next(
        (getattr(base, a) for a in ("norm", "ln_f", "final_layernorm") if hasattr(base, a)), None
    )
    head = model.get_output_embeddings() if has_lm_head(model) else None
    if norm is None or head is None:
        raise CalibrationError("no final norm and LM head found after the blocks")
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return Head(norm, head, softcap)


def sliced_loss(
    head: Head, hidden: torch.Tensor, tokens: torch.Tensor
) -> tuple[float, torch.Tensor | None]:
    """Summed cross-entropy of tokens[:, 1:] given hidden[:, :-1], and d loss / d hidden.

    `hidden` (batch, seq, hidden) is the last block's output. The gradient, same shape and zero
    at the last position, is None when `hidden` does not require grad; the graph below `hidden`
    is untouched (the caller sends the gradient on).
    """
    wants_grad = hidden.requires_grad
    cut = hidden.detach().requires_grad_(wants_grad)  # (batch, seq, hidden)
    targets = tokens[:, 1:]  # (batch, seq - 1)
    step = max(1, SLICE_ROWS // tokens.shape[0])
    total = 0.0
    with torch.set_grad_enabled(wants_grad):
        for start in range(0, targets.shape[1], step):
            stop = min(start + step, targets.shape[1])
            logits = head.logits(cut[:, start:stop])  # (batch, slice, vocab)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets[:, start:stop].reshape(-1),
                reduction="sum",
            )
            if wants_grad:
                loss.backward()
            total += loss.item()
    return total, cut.grad


def reproduces_loss(
    model: nn.Module, last_block: nn.Module, head: Head, tokens: torch.Tensor, rtol: float = 1e-3
) -> bool:
    """Does `head` on `last_block`'s output give the model's own summed loss on `tokens`?

    False where the model does something to the logits `Head` does not know (a logit scale):
    such a model keeps its own loss.
    """
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = last_block.register_forward_hook(keep)
    try:
        with torch.no_grad():
            mean = model(input_ids=tokens, labels=tokens, use_cache=False).loss.item()
            summed, _ = sliced_loss(head, captured[-1], tokens)
    finally:
        handle.remove()
    reference = mean * tokens.shape[0] * (tokens.shape[1] - 1)
    return abs(summed - reference) <= rtol * abs(reference)
