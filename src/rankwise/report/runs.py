"""A compressed directory as the report reads it: its manifest, size and stored figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rankwise.core.errors import ModelNotFoundError
from rankwise.storage.manifest import LayerEntry, Manifest
from rankwise.storage.saved import EVAL_FILE, directory_bytes, is_compressed_dir


@dataclass
class Run:
    """One compressed directory, as the report sees it."""

    directory: Path
    label: str
    manifest: Manifest
    bytes: int
    # {"perplexity": {stream: ppl}, "accuracy": {task: acc}, "windows": n}, each optional
    figures: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return bool(self.figures.get("perplexity") or self.figures.get("accuracy"))

    @property
    def targets(self) -> dict[str, LayerEntry]:
        """Per-layer entries in model order (the same source as `rankwise inspect`)."""
        return self.manifest.by_name()

    def kept(self) -> dict[str, float]:
        """Fraction of each targeted layer's parameters kept, sparse residuals included (1 where
        it stayed dense): model/accounting.py, as inspect counts it."""
        return {name: layer.count.kept_fraction for name, layer in self.targets.items()}


def read_run(directory: Path, label: str) -> Run:
    if not directory.is_dir():
        raise ModelNotFoundError(f"report: no such directory: {directory}")
    if not is_compressed_dir(directory):
        raise ModelNotFoundError(f"report: not a rankwise model directory: {directory}")
    stored = directory / EVAL_FILE
    figures = json.loads(stored.read_text()) if stored.is_file() else {}
    return Run(directory, label, Manifest.read(directory), directory_bytes(directory), figures)
