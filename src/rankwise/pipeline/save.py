"""A compression result written as a directory: its manifest built from the result's accounting."""

from __future__ import annotations

from rankwise.pipeline.compress import Compressed
from rankwise.storage.manifest import Manifest
from rankwise.storage.saved import save_compressed

RANKWISE_VERSION = "0.1.0"


def manifest_of(result: Compressed) -> Manifest:
    """What the saved directory records about the run (storage/manifest.py owns the format)."""
    recipe = result.recipe
    return Manifest(
        method=recipe.method,
        ratio=recipe.ratio,
        allocation=recipe.allocation,
        source_model=recipe.model,
        rankwise_version=RANKWISE_VERSION,
        targeted_ratio=result.targeted_ratio,
        model_ratio=result.model_ratio,
        targeted_params_before=result.targeted_before,
        targeted_params_after=result.targeted_after,
        model_params_before=result.model_params_before,
        model_params_after=result.model_params_after,
        seconds=result.seconds,
        recovery=result.recovery,
        merge_policy=recipe.merge_policy,
        layers=result.layers,
    )


def save(
    result: Compressed, out: str, tokenizer: object | None = None, overwrite: bool = False
) -> str:
    """Write a compression result as a loadable directory (atomic; refuses an existing `out`)."""
    manifest = manifest_of(result)
    path = save_compressed(
        result.model, out, manifest, tokenizer, result.recipe.to_yaml(), overwrite
    )
    return str(path)
