"""Singular-value spectra for the report: of the stored factors, and of the dense source weights.

The factors' product is never formed: a (rank, rank) SVD gives its spectrum exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from rankwise.recovery.truncate import product_core
from rankwise.report.runs import Run
from rankwise.storage.saved import WEIGHTS

SPECTRA_LAYERS = 4


def factor_spectrum(left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
    """Singular values of left @ right without forming it: with left = Ql Rl and right^T = Qr Rr,
    left @ right = Ql (Rl Rr^T) Qr^T, so they are those of the small (rank, rank) Rl Rr^T."""
    core = product_core(left, right)[1]  # (rank, rank)
    return torch.linalg.svdvals(core).numpy()  # (rank,)


def select_layers(run: Run, count: int = SPECTRA_LAYERS) -> list[str]:
    """A few telling layers: the first, the most compressed, the median, the least, the last."""
    kept = {n: f for n, f in run.kept().items() if run.targets[n].factorized}
    if not kept:
        return []
    names = list(kept)
    ordered = sorted(kept, key=kept.get)  # most compressed first
    chosen = [names[0], ordered[0], ordered[len(ordered) // 2], ordered[-1], names[-1]]
    return list(dict.fromkeys(chosen))[:count]


def run_spectra(run: Run, layers: list[str]) -> dict[str, np.ndarray]:
    spectra = {}
    with safe_open(str(run.directory / WEIGHTS), framework="pt") as weights:
        keys = set(weights.keys())
        for layer in layers:
            if f"{layer}.left" in keys and f"{layer}.right" in keys:
                left = weights.get_tensor(f"{layer}.left")  # (out, rank)
                right = weights.get_tensor(f"{layer}.right")  # (rank, in)
                spectra[layer] = factor_spectrum(left, right)
    return spectra


def dense_weights_file(run: Run) -> Path | None:
    """The source model's safetensors, where it can still be found (bundled cache or a dir)."""
    from rankwise.storage.sources import BUNDLED, cache_dir

    source = run.manifest.source_model or ""
    if source in BUNDLED:
        candidates = [cache_dir() / BUNDLED[source][0] / WEIGHTS]
    else:
        candidates = [Path(source) / WEIGHTS, run.directory.parent / source / WEIGHTS]
    return next((path for path in candidates if source and path.is_file()), None)


def dense_spectra(runs: list[Run], layers: list[str]) -> dict[str, np.ndarray]:
    """Spectra of the source model's weights, for the layers whose shape matches the target's
    (a model compressed in memory records the recipe's model name, which may be another model)."""
    path = next((p for p in map(dense_weights_file, runs) if p is not None), None)
    if path is None:
        return {}
    spectra = {}
    with safe_open(str(path), framework="pt") as weights:
        keys = set(weights.keys())
        for layer in (name for name in layers if f"{name}.weight" in keys):
            target = next(run.targets[layer] for run in runs if layer in run.targets)
            shape = tuple(weights.get_slice(f"{layer}.weight").get_shape())
            if sorted(shape) != sorted((target.out_features, target.in_features)):
                continue
            weight = weights.get_tensor(f"{layer}.weight")  # (out, in), GPT-2's (in, out)
            spectra[layer] = torch.linalg.svdvals(weight.double()).numpy()
    return spectra
