"""Compression checkpoints: a killed run restarts from its last finished block (`--resume`).

Beside the output, `.NAME.compress/` holds, in safetensors and JSON (nothing pickled):
- `estimate.safetensors`: the importance estimate the last round allocates by (spectra, output
  Fisher), so a resumed run allocates the same ranks without measuring again;
- `block-NNNN.safetensors`: the factorized layers of each finished block;
- `hidden-NNNN.safetensors`: the outputs of the last finished block, the next block's inputs;
- `meta.json`: the run's fingerprint, the last finished block and every finished layer's entry.

`meta.json` is written last (to a temporary name, then renamed): it is the commit point, so a
run killed while writing a block's files resumes from the block before. Blocks after it run as
they would have: the inputs, factors and ranks are bit for bit the ones the killed run had, so
the resumed model equals an uninterrupted run's. Sequential (and staged) calibration
checkpoints; a one-pass run (`--no-sequential`, `--stats`) starts again from the beginning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.allocation.plan import Estimate
from rankwise.core.errors import RankwiseError
from rankwise.core.recipe import Recipe
from rankwise.model.modules import set_module
from rankwise.storage.manifest import LayerEntry
from rankwise.storage.saved import layer_from_entry

META = "meta.json"
ESTIMATE = "estimate.safetensors"


def fingerprint(recipe: Recipe, windows: torch.Tensor, model: nn.Module) -> dict[str, object]:
    """What must not change between a run and its resumption: the recipe as resolved, the
    calibration windows (by digest) and the model's parameter shapes."""
    digest = hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16]
    shapes = hashlib.sha256(
        repr([(k, tuple(v.shape)) for k, v in model.state_dict().items()]).encode()
    ).hexdigest()[:16]
    return {"recipe": recipe.model_dump(mode="json"), "windows": digest, "model": shapes}


class CompressCheckpoint:
    """A run's checkpoint directory; `fingerprint` must match to resume from it."""

    def __init__(self, directory: str | Path, print_: dict[str, object] | None = None) -> None:
        self.directory = Path(directory)
        self.fingerprint = print_

    @classmethod
    def beside(cls, out: str | Path) -> CompressCheckpoint:
        out = Path(out)
        return cls(out.parent / f".{out.name}.compress")

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- the estimate ------------------------------------------------------------------------

    def has_estimate(self) -> bool:
        """Whether a killed run got as far as its last round's allocation."""
        return self._meta() is not None

    def saved_estimate(self) -> Estimate | None:
        """The estimate a killed run allocated its last round by (None: uniform allocation)."""
        meta = self._meta()
        if meta is None or meta["estimate"] != "file":
            return None
        tensors = load_file(str(self.directory / ESTIMATE))
        names = meta["names"]
        spectra = {n: tensors[f"spectrum/{n}"] for n in names if f"spectrum/{n}" in tensors}
        fisher = {n: tensors.get(f"fisher/{n}") for n in names}
        measured = {n: {int(r): loss for r, loss in p.items()} for n, p in meta["measured"].items()}
        return Estimate(spectra, fisher, measured)

    def save_estimate(self, estimate: Estimate | None, names: list[str]) -> None:
        """Record the last round's estimate (None: uniform allocation) before it factorizes."""
        self.directory.mkdir(parents=True, exist_ok=True)
        measured: dict[str, dict[int, float]] = {}
        if estimate is not None:
            tensors = {f"spectrum/{n}": s.contiguous() for n, s in estimate.spectra.items()}
            for name, value in estimate.fisher.items():
                if value is not None:
                    tensors[f"fisher/{name}"] = value.contiguous()
            _write_tensors(tensors, self.directory / ESTIMATE)
            measured = estimate.measured
        meta = {
            "fingerprint": self.fingerprint,
            "estimate": "file" if estimate is not None else "uniform",
            "names": names,
            "measured": {n: {str(r): v for r, v in p.items()} for n, p in measured.items()},
            "done": -1,
            "entries": [],
        }
        self._write_meta(meta)

    # --- finished blocks ---------------------------------------------------------------------

    def save_block(
        self,
        index: int,
        entries: list[LayerEntry],
        model: nn.Module,
        outputs: list[torch.Tensor],
    ) -> None:
        """Block `index` finished: its layers' tensors, its outputs, then the commit."""
        meta = self._meta()
        assert meta is not None, "save_estimate comes first"
        tensors = {
            f"{entry.name}.{key}": value.detach().cpu().contiguous()
            for entry in entries
            for key, value in model.get_submodule(entry.name).state_dict().items()
        }
        _write_tensors(tensors, self.directory / f"block-{index:04d}.safetensors")
        hidden = {f"hidden/{i}": h.detach().cpu().contiguous() for i, h in enumerate(outputs)}
        _write_tensors(hidden, self.directory / f"hidden-{index:04d}.safetensors")
        previous = meta["done"]
        meta["done"] = index
        meta["entries"] = meta["entries"] + [e.model_dump(mode="json") for e in entries]
        self._write_meta(meta)
        (self.directory / f"hidden-{previous:04d}.safetensors").unlink(missing_ok=True)

    def restore(self, model: nn.Module) -> tuple[int, list[torch.Tensor] | None, list[LayerEntry]]:
        """Install the finished blocks' layers in `model`: (the first block still to run, its
        inputs (None: from the start), the finished layers' entries)."""
        meta = self._meta()
        if meta is None or meta["done"] < 0:
            return 0, None, []
        entries = [LayerEntry.model_validate(e) for e in meta["entries"]]
        tensors: dict[str, torch.Tensor] = {}
        for path in sorted(self.directory.glob("block-*.safetensors")):
            if int(path.stem.split("-")[1]) <= meta["done"]:
                tensors.update(load_file(str(path)))
        for entry in entries:
            if entry.rank is None:
                continue
            layer = layer_from_entry(entry)
            prefix = entry.name + "."
            layer.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            set_module(model, entry.name, layer)
        saved = load_file(str(self.directory / f"hidden-{meta['done']:04d}.safetensors"))
        hidden = [saved[f"hidden/{i}"] for i in range(len(saved))]
        return meta["done"] + 1, hidden, entries

    # --- meta ----------------------------------------------------------------------------------

    def _meta(self) -> dict | None:
        path = self.directory / META
        if not path.is_file():
            return None
        meta = json.loads(path.read_text())
        if self.fingerprint is not None and meta.get("fingerprint") != self.fingerprint:
            raise RankwiseError(
                f"checkpoint {self.directory} was written by a different run (recipe, text or "
                "model differ); remove it or run without --resume"
            )
        return meta

    def _write_meta(self, meta: dict) -> None:
        partial = self.directory / (META + ".partial")
        partial.write_text(json.dumps(meta))
        os.replace(partial, self.directory / META)


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial))
    os.replace(partial, path)
