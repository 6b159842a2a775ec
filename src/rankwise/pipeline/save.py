"""A compression result written as a directory: its manifest built from the result's accounting."""

from __future__ import annotations

import itertools

import torch
from torch import nn

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
    """Write a compression result as a loadable directory (atomic; refuses an existing `out`).

    The weights are saved in `recipe.dtype`; the model in memory is rounded to it first (and
    kept in its own dtype), so what is evaluated after saving is what was saved.
    """
    manifest = manifest_of(result)
    dtype = getattr(torch, result.recipe.dtype)
    round_to(result.model, dtype)
    path = save_compressed(
        result.model, out, manifest, tokenizer, result.recipe.to_yaml(), overwrite, dtype
    )
    return str(path)


def round_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer rounded to `dtype`, kept in its own dtype."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.copy_(tensor.to(dtype))
