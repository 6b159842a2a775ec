"""The teacher's next-token distributions, kept as top-k logits on disk.

For a model whose teacher and student do not fit in memory together, the teacher runs once over
every training window first; then only its top-k log-probabilities (and the log-mass of the rest
of the vocabulary, as one tail bucket) are kept, in a safetensors file, and the teacher is freed.
The loss against them is the exact KL divergence of the coarsened distributions (top-k tokens
plus one bucket for everything else), which equals the full KL when the tail is negligible.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.core.errors import RankwiseError
from rankwise.core.progress import Advance


def top_k_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities (..., k) float32, token ids (..., k) int32) of the k likeliest tokens."""
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (..., vocab)
    values, ids = log_probs.topk(k, dim=-1)  # (..., k)
    return values, ids.int()


def tail_log_mass(log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(log_probs))) over the last dim, stable when the top-k hold nearly all."""
    head = torch.logsumexp(log_probs, dim=-1)  # (...,) log of the top-k mass, <= 0
    return torch.log((-torch.expm1(head)).clamp_min(1e-12))  # (...,)


def top_k_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
             teacher_ids: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Mean over tokens of KL(teacher || student) on the top-k tokens plus one tail bucket."""
    student = F.log_softmax(student_logits.float(), dim=-1)  # (batch, seq, vocab)
    student_top = student.gather(-1, teacher_ids.long())  # (batch, seq, k)
    teacher_tail = tail_log_mass(teacher_log_probs)  # (batch, seq)
    student_tail = tail_log_mass(student_top)  # (batch, seq)
    p_top = teacher_log_probs.exp()  # (batch, seq, k)
    kl = (p_top * (teacher_log_probs - student_top)).sum(-1)  # (batch, seq)
    kl = kl + teacher_tail.exp() * (teacher_tail - student_tail)
    return kl.mean()


class TeacherCache:
    """Top-k teacher targets for windows, stored in one safetensors file keyed by window index."""

    def __init__(self, path: str | Path, k: int) -> None:
        self.path, self.k = Path(path), k
        self.targets: dict[str, torch.Tensor] = {}

    def build(
        self,
        teacher: nn.Module,
        windows: torch.Tensor,
        indices: list[int],
        advance: Advance | None = None,
    ) -> None:
        """Run the teacher over `windows[indices]` once (or read the file a previous run wrote)."""
        if self.path.is_file():
            self.targets = load_file(str(self.path))
            if all(f"values/{i}" in self.targets for i in indices):
                return
        device = next(teacher.parameters()).device
        with torch.inference_mode():
            for index in indices:
                window = windows[index : index + 1].to(device)
                logits = teacher(input_ids=window, use_cache=False).logits
                values, ids = top_k_targets(logits[0], self.k)  # (seq, k) each
                self.targets[f"values/{index}"] = values.cpu()  # the file is written from here
                self.targets[f"ids/{index}"] = ids.cpu()
                if advance:
                    advance(1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        save_file(self.targets, str(partial))
        partial.replace(self.path)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs (batch, seq, k), ids (batch, seq, k)) of the windows at `indices`."""
        try:
            values = torch.stack([self.targets[f"values/{int(i)}"] for i in indices])
            ids = torch.stack([self.targets[f"ids/{int(i)}"] for i in indices])
        except KeyError as err:
            raise RankwiseError(f"teacher cache {self.path} lacks window {err}") from None
        return values, ids
