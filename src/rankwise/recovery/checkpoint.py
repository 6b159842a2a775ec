"""Recovery checkpoints: trained tensors and AdamW moments in safetensors, the rest in JSON.

No pickles: the optimizer's state is taken apart into plain tensors (one `exp_avg`, `exp_avg_sq`
and `step` per parameter, keyed by the parameter's name) and put back the same way. Each
checkpoint is written to a temporary directory and renamed, so a run killed while saving leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.core.atomic import atomic_directory
from rankwise.core.errors import RankwiseError

STATE = "state.safetensors"
META = "meta.json"
MOMENTS = ("exp_avg", "exp_avg_sq", "step")


class Checkpoints:
    """A directory of `step-NNNNNN/` checkpoints; `fingerprint` must match to resume."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, object]) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint

    def latest(self) -> Path | None:
        found = sorted(self.directory.glob("step-*")) if self.directory.is_dir() else []
        found = [p for p in found if (p / META).is_file() and (p / STATE).is_file()]
        return found[-1] if found else None

    def save(
        self,
        step: int,
        params: dict[str, nn.Parameter],
        optimizer: torch.optim.Optimizer,
        losses: list[float],
    ) -> Path:
        tensors = {f"param/{name}": p.detach().contiguous() for name, p in params.items()}
        for name, param in params.items():
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"{key}/{name}"] = torch.as_tensor(value).detach().clone().contiguous()
        target = self.directory / f"step-{step:06d}"
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_directory(target) as tmp:
            save_file(tensors, str(tmp / STATE))
            meta = {"step": step, "losses": losses, "fingerprint": self.fingerprint}
            (tmp / META).write_text(json.dumps(meta))
        for older in self.directory.glob("step-*"):
            if older != target and older.name < target.name:
                shutil.rmtree(older, ignore_errors=True)
        return target

    def restore(
        self, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> tuple[int, list[float]]:
        """Load the latest checkpoint into `params` and `optimizer`: (step, losses so far)."""
        path = self.latest()
        if path is None:
            return 0, []
        meta = json.loads((path / META).read_text())
        if meta["fingerprint"] != self.fingerprint:
            raise RankwiseError(
                f"checkpoint {path} was written by a different run; remove it or change --out"
            )
        tensors = load_file(str(path / STATE))
        with torch.no_grad():
            for name, param in params.items():
                key = f"param/{name}"
                if key not in tensors or tensors[key].shape != param.shape:
                    raise RankwiseError(f"checkpoint {path} does not match the model at {name}")
                param.copy_(tensors[key])
        for name, param in params.items():
            state = {k: tensors[f"{k}/{name}"] for k in MOMENTS if f"{k}/{name}" in tensors}
            if state:
                optimizer.state[param] = state
        return int(meta["step"]), list(meta["losses"])

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
