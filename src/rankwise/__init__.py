"""rankwise: make pretrained transformers smaller by importance-aware matrix factorization.

import rankwise
loaded = rankwise.load_model("default")
result = rankwise.compress(loaded.model, rankwise.Recipe(method="whiten", ratio=0.2),
                           tokenizer=loaded.tokenizer)
rankwise.save(result, "out", tokenizer=loaded.tokenizer)
model = rankwise.load("out")
"""

from __future__ import annotations

from rankwise.core.errors import RankwiseError
from rankwise.core.hardware import CpuFacts
from rankwise.core.recipe import Recipe, RecoverConfig
from rankwise.model.layers import LowRankLinear
from rankwise.pipeline.compress import Compressed, compress
from rankwise.recovery.distill import recover
from rankwise.storage.merge import merge_decision
from rankwise.storage.saved import load, save_compressed
from rankwise.storage.sources import load_model

__version__ = "0.1.0"


def save(
    result: Compressed, out: str, tokenizer: object | None = None, overwrite: bool = False
) -> str:
    """Write a compression result as a loadable directory (atomic; refuses an existing `out`)."""
    info = {
        "method": result.recipe.method,
        "ratio": result.recipe.ratio,
        "allocation": result.recipe.allocation,
        "targeted_ratio": result.targeted_ratio,
        "model_ratio": result.model_ratio,
        "source_model": result.recipe.model,
        "rankwise_version": __version__,
        "targeted_params_before": result.targeted_before,
        "targeted_params_after": result.targeted_after,
        "model_params_before": result.model_params_before,
        "model_params_after": result.model_params_after,
        "seconds": result.seconds,
        "recovery": (
            {k: v for k, v in result.recovery.items() if k != "losses"} if result.recovery else None
        ),
        "merge_policy": result.recipe.merge_policy,
        "merge": merge_decision(
            result.model, result.recipe.merge_policy, CpuFacts.detect().describe()
        ),
        # A list, not a mapping: config.json is written with sorted keys, and the per-layer
        # table should read in model order.
        "targets": [
            {
                "name": layer.name,
                "out": layer.out_features,
                "in": layer.in_features,
                "rank": layer.rank,
                "rel_error": layer.rel_error,
                "est_loss": layer.est_loss,
                "nnz": layer.nnz,
                "kept_params": layer.kept_params,
            }
            for layer in result.layers
        ],
    }
    path = save_compressed(result.model, out, tokenizer, result.recipe.to_yaml(), info, overwrite)
    return str(path)


__all__ = [
    "Compressed",
    "LowRankLinear",
    "RankwiseError",
    "Recipe",
    "RecoverConfig",
    "compress",
    "load",
    "load_model",
    "recover",
    "save",
    "__version__",
]
