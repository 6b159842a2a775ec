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
from rankwise.core.recipe import Recipe, RecoverConfig
from rankwise.model.layers import LowRankLinear
from rankwise.pipeline.compress import Compressed, compress
from rankwise.pipeline.save import RANKWISE_VERSION, save
from rankwise.recovery.distill import recover
from rankwise.storage.saved import load
from rankwise.storage.sources import load_model

__version__ = RANKWISE_VERSION


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
