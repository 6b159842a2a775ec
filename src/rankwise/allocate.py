"""Rank allocation: turn one global ratio into a rank per layer.

`uniform` removes the same fraction from every layer (per-pattern overrides aside). A layer whose
rank would not save parameters stays dense (rank None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rankwise.layers import saves_parameters
from rankwise.recipe import LayerOverride, check_ratio


@dataclass(frozen=True)
class LayerShape:
    name: str
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def factor_params(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)

    @property
    def break_even_rank(self) -> float:
        """out*in/(out+in): at or above this rank the factors cost as much as the dense matrix."""
        return self.dense_params / (self.out_features + self.in_features)


def matching_override(name: str, overrides: list[LayerOverride]) -> LayerOverride | None:
    """The last override whose pattern matches (later entries refine earlier ones)."""
    found = None
    for override in overrides:
        if re.search(override.pattern, name):
            found = override
    return found


def uniform_rank(shape: LayerShape, ratio: float) -> int | None:
    """The rank that removes `ratio` of this layer's parameters; None when that saves nothing."""
    rank = max(1, int((1.0 - ratio) * shape.break_even_rank))
    if not saves_parameters(rank, shape.out_features, shape.in_features):
        return None
    return rank


def allocate_uniform(
    shapes: list[LayerShape], ratio: float, overrides: list[LayerOverride] | None = None
) -> dict[str, int | None]:
    """Every layer keeps (1 - ratio) of its parameters, then the rounding is given back.

    Rounding each rank down would remove a little more than asked; the parameters it frees go
    back one rank at a time to the layers that lost the largest fraction of a rank, so the
    targeted ratio lands on the request (never above the budget).
    """
    check_ratio(ratio)
    ranks: dict[str, int | None] = {}
    wanted: dict[str, float] = {}  # exact (fractional) rank each factorized layer should get
    budget = 0.0
    for shape in shapes:
        override = matching_override(shape.name, overrides or [])
        if override is not None and override.dense:
            ranks[shape.name] = None
            continue
        layer_ratio = override.ratio if override and override.ratio is not None else ratio
        rank = uniform_rank(shape, check_ratio(layer_ratio, f"ratio for {shape.name}"))
        ranks[shape.name] = rank
        if rank is not None:
            wanted[shape.name] = (1.0 - layer_ratio) * shape.break_even_rank
            budget += shape.factor_params(1) * wanted[shape.name]
    by_name = {s.name: s for s in shapes}
    spare = budget - sum(by_name[n].factor_params(ranks[n]) for n in wanted)
    for name in sorted(wanted, key=lambda n: ranks[n] - wanted[n]):  # most shortchanged first
        cost = by_name[name].factor_params(1)
        grown = ranks[name] + 1
        if cost <= spare and saves_parameters(grown, *_dims(by_name[name])):
            ranks[name] = grown
            spare -= cost
    return ranks


def _dims(shape: LayerShape) -> tuple[int, int]:
    return shape.out_features, shape.in_features


def targeted_params(shapes: list[LayerShape], ranks: dict[str, int | None]) -> tuple[int, int]:
    """(dense, compressed) weight parameters of the targeted layers (biases excluded: unchanged)."""
    dense = sum(s.dense_params for s in shapes)
    kept = sum(
        s.dense_params if ranks.get(s.name) is None else s.factor_params(ranks[s.name])
        for s in shapes
    )
    return dense, kept
