"""The saved format's one owner: the `rankwise` block of a compressed directory's config.json.

Only this module reads or writes that block. Version 2 keeps one per-layer list (`layers`: every
targeted layer in model order, dense ones with rank None); version 1 kept two overlapping ones
(`layers`, a mapping of the factorized modules' shapes, and `targets`, the per-layer report), and
is read by converting it (tests/fixtures/v1_tiny holds a directory the version-1 code wrote).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rankwise.core.errors import ModelNotFoundError
from rankwise.model.accounting import LayerCount

FORMAT_VERSION = 2


class LayerEntry(BaseModel):
    """One targeted layer as saved: its shape, what it became, what that cost and lost."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    out_features: int = Field(alias="out")
    in_features: int = Field(alias="in")
    rank: int | None  # None: kept dense
    bias: bool = False
    nnz: int = 0  # nonzeros of a sparse residual
    rel_error: float | None = None  # the method's relative error; None after truncation
    est_loss: float | None = None  # importance allocation's estimate
    truncation_error: float | None = None  # `rankwise truncate`: weight error of the cut
    # a modular run's narrowed layer (a plain dense module): outputs / inputs kept (None: all)
    kept_out: int | None = None
    kept_in: int | None = None

    @property
    def count(self) -> LayerCount:
        return LayerCount(
            self.out_features, self.in_features, self.rank, self.nnz, self.kept_out, self.kept_in
        )

    @property
    def narrowed(self) -> bool:
        return self.kept_out is not None or self.kept_in is not None

    @property
    def factorized(self) -> bool:
        return self.rank is not None


class MergeDecision(BaseModel):
    """Which factorized layers `rankwise.load` merges back to dense (decided once, at save)."""

    model_config = ConfigDict(extra="forbid")
    policy: str
    merged: list[str] = Field(default_factory=list)
    machine: str | None = None  # where "auto" timed it


class Manifest(BaseModel):
    """Everything rankwise records about a compressed directory."""

    model_config = ConfigDict(extra="forbid")
    version: int = FORMAT_VERSION
    method: str
    ratio: float  # requested
    allocation: str = "uniform"
    source_model: str | None = None
    rankwise_version: str | None = None
    targeted_ratio: float
    model_ratio: float
    targeted_params_before: int
    targeted_params_after: int
    model_params_before: int
    model_params_after: int
    seconds: dict[str, float] = Field(default_factory=dict)
    recovery: dict[str, Any] | None = None
    truncated_from: float | None = None  # `rankwise truncate`: the targeted ratio before
    merge_policy: str = "auto"  # the recipe's
    merge: MergeDecision | None = None
    layers: list[LayerEntry]

    @field_validator("recovery")
    @classmethod
    def _summary_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """What distillation did, without its per-step losses (they go to --json, not here)."""
        return None if value is None else {k: v for k, v in value.items() if k != "losses"}

    def factorized(self) -> dict[str, LayerEntry]:
        return {layer.name: layer for layer in self.layers if layer.factorized}

    def by_name(self) -> dict[str, LayerEntry]:
        return {layer.name: layer for layer in self.layers}

    def to_block(self) -> dict[str, Any]:
        block = self.model_dump(mode="json", by_alias=True)
        for layer in block["layers"]:  # full-width layers are written as before modular existed
            for key in ("kept_out", "kept_in"):
                if layer[key] is None:
                    del layer[key]
        return block

    @classmethod
    def from_block(cls, block: dict[str, Any]) -> Manifest:
        if int(block.get("version", 1)) < 2:
            block = upgrade_v1(block)
        return cls.model_validate(block)

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        """The manifest of a compressed directory (ModelNotFoundError when it has none)."""
        path = Path(directory) / "config.json"
        try:
            block = json.loads(path.read_text())["rankwise"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ModelNotFoundError(f"not a rankwise model directory: {directory}") from None
        return cls.from_block(block)


def upgrade_v1(block: dict[str, Any]) -> dict[str, Any]:
    """A version-1 block in version 2's shape: `targets` (the report) joined with `layers` (the
    factorized modules' bias flags); the derived `kept_params` is dropped (accounting owns it)."""
    shapes = block.get("layers", {})
    entries = []
    for target in block.get("targets", []):
        entry = {k: v for k, v in target.items() if k != "kept_params"}
        entry["bias"] = bool(shapes.get(target["name"], {}).get("bias", False))
        entries.append(entry)
    if not entries:  # a v1 block without the report: the factorized modules alone
        entries = [
            {"name": n, "out": s["out"], "in": s["in"], "rank": s["rank"], "bias": s["bias"],
             "nnz": s.get("nnz", 0)}
            for n, s in shapes.items()
        ]  # fmt: skip
    known = set(Manifest.model_fields) - {"layers", "version"}
    upgraded = {k: v for k, v in block.items() if k in known}
    return {**upgraded, "version": FORMAT_VERSION, "layers": entries}
