"""Method registry: a new method is one file plus one entry here."""

from __future__ import annotations

from rankwise.core.errors import RankwiseError
from rankwise.methods.base import Factors, LayerStats, Method, MethodOptions
from rankwise.methods.fwsvd import FWSVD
from rankwise.methods.modular import Modular
from rankwise.methods.sparse import Sparse
from rankwise.methods.svd import SVD
from rankwise.methods.whiten import Whiten

REGISTRY: dict[str, type] = {
    "svd": SVD,
    "fwsvd": FWSVD,
    "whiten": Whiten,
    "sparse": Sparse,
    "modular": Modular,
}


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise RankwiseError(f"unknown method '{name}'; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]()


__all__ = ["Factors", "LayerStats", "Method", "MethodOptions", "REGISTRY", "get_method"]
