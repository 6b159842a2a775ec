"""Recovery: distil the original model into the factors.

The compressed model (student) is trained to match the next-token distribution of the original
model (teacher): loss = KL(teacher || student) per predicted token, optionally plus a matching of
the last hidden state. Only the factors (LowRankLinear's left/right) train; embeddings, norms, the
LM head and layers kept dense stay frozen, so what is saved keeps the compressed size.

Everything that decides a step (the windows it sees, its learning rate) is a pure function of the
step number and the seed, and a checkpoint holds the trained tensors and AdamW's moments; so a run
resumed from a checkpoint computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.errors import CalibrationError, RankwiseError
from rankwise.core.hardware import choose_dtype
from rankwise.core.progress import Reporter
from rankwise.core.recipe import RecoverConfig
from rankwise.model.layers import LowRankLinear
from rankwise.recovery.checkpoint import Checkpoints
from rankwise.recovery.teacher import TeacherCache, top_k_kl


@dataclass
class RecoverLog:
    """What happened: loss per step, and the throughput."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    start_step: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def trainable_factors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The factor parameters (and sparse values, when a layer has them), by state-dict name."""
    params: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            for key, param in module.named_parameters(recurse=False):
                if key != "bias":
                    params[f"{name}.{key}"] = param
    return params


def freeze_all_but(model: nn.Module, trainable: dict[str, nn.Parameter]) -> None:
    keep = {id(p) for p in trainable.values()}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)


def learning_rate(step: int, config: RecoverConfig) -> float:
    """Linear warm-up over `warmup * steps`, then cosine from `lr` down to `min_lr * lr`."""
    warm = max(1, round(config.warmup * config.steps))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr + (1.0 - config.min_lr) * cosine)


def batch_indices(step: int, count: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices of `step`: a fresh seeded permutation per pass over the windows."""
    per_epoch = max(1, count // batch_size)
    epoch, offset = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(count, generator=generator)  # (count,)
    return order[offset * batch_size : (offset + 1) * batch_size]


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on the next-token distributions, times T^2."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")  # (tokens, vocab)
    return kl * temperature**2


def hidden_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """MSE of the last hidden states relative to the teacher's mean square (scale-free)."""
    teacher_hidden = teacher_hidden.float()
    scale = teacher_hidden.square().mean().clamp_min(1e-12)
    return (student_hidden.float() - teacher_hidden).square().mean() / scale


class Distiller:
    """One student, a frozen teacher (live, or its top-k targets on disk), AdamW on the factors."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        config: RecoverConfig,
        cache: TeacherCache | None = None,
    ) -> None:
        self.student, self.teacher, self.config, self.cache = student, teacher, config, cache
        self.params = trainable_factors(student)
        if not self.params:
            raise RankwiseError("the model has no factorized layers to recover")
        freeze_all_but(student, self.params)
        if teacher is not None:
            teacher.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=config.lr,
            betas=(0.9, 0.95),
            weight_decay=config.weight_decay,
        )
        self.device = next(student.parameters()).device
        self.dtype_choice = choose_dtype(config.dtype, self.device)
        self.autocast_dtype = self.dtype_choice.dtype

    def _teacher_outputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        want_hidden = self.config.hidden_weight > 0
        with torch.no_grad(), self._autocast():
            out = self.teacher(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
        hidden = out.hidden_states[-1] if want_hidden else None
        return out.logits, hidden  # (batch, seq, vocab), (batch, seq, hidden)

    def _autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def loss(self, batch: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """Distillation loss of the student on `batch` (batch, seq), with its graph; `indices`
        name the windows in the teacher cache, when there is one."""
        if self.cache is not None:
            with self._autocast():
                logits = self.student(input_ids=batch, use_cache=False).logits
            values, ids = self.cache.batch(indices)
            return top_k_kl(logits, values.to(self.device), ids.to(self.device))
        teacher_logits, teacher_hidden = self._teacher_outputs(batch)
        want_hidden = teacher_hidden is not None
        with self._autocast():
            out = self.student(input_ids=batch, use_cache=False, output_hidden_states=want_hidden)
        loss = distill_loss(out.logits, teacher_logits, self.config.temperature)
        if want_hidden:
            loss = loss + self.config.hidden_weight * hidden_loss(
                out.hidden_states[-1], teacher_hidden
            )
        return loss

    def step(self, step: int, batch: torch.Tensor, indices: torch.Tensor | None = None) -> float:
        lr = learning_rate(step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch.to(self.device), indices)
        if not torch.isfinite(loss):
            raise RankwiseError(f"recovery diverged at step {step}: loss {float(loss)}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.clip)
        self.optimizer.step()
        return float(loss.detach())


def check_windows(windows: torch.Tensor, config: RecoverConfig) -> None:
    if windows.ndim != 2 or len(windows) == 0:
        raise CalibrationError("recovery needs at least one training window")
    if config.steps < 1:
        raise RankwiseError(f"recovery steps must be at least 1, got {config.steps}")
    if config.teacher_topk and config.hidden_weight:
        raise RankwiseError("hidden-state matching needs the live teacher (teacher_topk 0)")


def cached_teacher(
    teacher: nn.Module | Callable[[], nn.Module],
    windows: torch.Tensor,
    config: RecoverConfig,
    path: Path,
    reporter: Reporter,
) -> TeacherCache:
    """The teacher's top-k targets for every window the run will see, computed once."""
    needed = torch.cat(
        [
            batch_indices(s, len(windows), config.batch_size, config.seed)
            for s in range(config.steps)
        ]
    )
    indices = sorted(set(needed.tolist()))
    cache = TeacherCache(path, config.teacher_topk)
    with reporter.task("teacher top-k", total=len(indices)) as advance:
        model = teacher() if callable(teacher) and not isinstance(teacher, nn.Module) else teacher
        cache.build(model.eval(), windows, indices, advance)
    return cache


def recover(
    student: nn.Module,
    teacher: nn.Module | Callable[[], nn.Module],
    windows: torch.Tensor,
    config: RecoverConfig,
    reporter: Reporter | None = None,
    checkpoints: Checkpoints | None = None,
    on_step: Callable[[int, float], None] | None = None,
    device: torch.device | None = None,
) -> RecoverLog:
    """Train the student's factors for `config.steps` steps on `windows` (count, seq_len).

    `teacher` is the original model, or a function that loads it (with `teacher_topk`, it is
    then loaded only for the top-k pass and freed). With `checkpoints`, the state is saved every
    `checkpoint_every` steps, and a run whose checkpoint directory holds one continues from the
    latest; the teacher cache lives there too. With `device`, student and teacher train there,
    and the student comes back to where it was.
    """
    reporter = reporter or Reporter()
    check_windows(windows, config)
    home = next(student.parameters()).device
    device = device or home
    student.to(device)

    def on_device(model: nn.Module) -> nn.Module:
        return model.to(device)

    student.eval()  # no dropout: a step is a pure function of the weights and the batch
    cache = None
    if config.teacher_topk:
        with tempfile.TemporaryDirectory() as scratch:
            where = checkpoints.directory if checkpoints is not None else Path(scratch)
            loader = teacher if isinstance(teacher, nn.Module) else lambda: on_device(teacher())
            cache = cached_teacher(loader, windows, config, where / "teacher.safetensors", reporter)
        teacher = None
    elif callable(teacher) and not isinstance(teacher, nn.Module):
        teacher = teacher()
    if teacher is not None:
        on_device(teacher).eval()
    distiller = Distiller(student, teacher, config, cache)
    choice = distiller.dtype_choice
    reporter.log(f"recovery dtype {choice.name}: {choice.reason}")
    log = RecoverLog()
    if checkpoints is not None:
        log.start_step, log.losses = checkpoints.restore(distiller.params, distiller.optimizer)
        if log.start_step:
            reporter.log(f"resuming recovery at step {log.start_step}")
    start, paused = time.perf_counter(), 0.0
    with reporter.task("recovering", total=config.steps) as advance:
        advance(log.start_step)
        for step in range(log.start_step, config.steps):
            ids = batch_indices(step, len(windows), config.batch_size, config.seed)
            batch = windows[ids]  # (batch, seq)
            log.losses.append(distiller.step(step, batch, ids))
            log.tokens += batch.numel()
            log.seconds = time.perf_counter() - start - paused
            advance(1, status=f"loss {log.losses[-1]:.4f}  {log.tokens_per_second:.0f} tok/s")
            if on_step is not None:  # its time (e.g. a held-out evaluation) is not training
                callback_start = time.perf_counter()
                on_step(step + 1, log.losses[-1])
                paused += time.perf_counter() - callback_start
            done = step + 1
            if checkpoints is not None and (
                done % config.checkpoint_every == 0 and done < config.steps
            ):
                checkpoints.save(done, distiller.params, distiller.optimizer, log.losses)
    student.requires_grad_(False)
    student.to(home)
    return log
