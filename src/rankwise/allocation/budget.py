"""Rank allocation: turn one global ratio into a rank per layer.

`uniform` removes the same fraction from every layer (per-pattern overrides aside).
`importance` spends one global parameter budget where it buys the largest estimated loss
decrease (see `allocate_importance`). A layer whose rank would not save parameters stays dense
(rank None) and is counted at its dense size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from rankwise.core.errors import RatioError
from rankwise.core.recipe import LayerOverride, check_ratio
from rankwise.model.accounting import LayerShape
from rankwise.model.layers import saves_parameters


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


@dataclass
class _Curve:
    """One free layer in the greedy: its bounds and the loss each next component removes."""

    shape: LayerShape
    gains: torch.Tensor  # (k,) float64 estimated loss removed by component i (decreasing)
    min_rank: int
    max_rank: int  # largest rank that still saves parameters (and respects max_keep)
    may_densify: bool  # the step past max_rank is "keep dense"


def _curve(
    shape: LayerShape, gains: torch.Tensor, override: LayerOverride | None
) -> _Curve | int | None:
    """The layer's greedy curve, or its fixed rank (int, or None for dense) when it is not free."""
    if override is not None and override.dense:
        return None
    if override is not None and override.ratio is not None:
        return uniform_rank(shape, override.ratio)
    min_keep = override.min_keep if override and override.min_keep is not None else 0.0
    max_keep = override.max_keep if override and override.max_keep is not None else 1.0
    if min_keep > max_keep:
        raise RatioError(f"min_keep {min_keep} > max_keep {max_keep} for {shape.name}")
    top = math.ceil(shape.break_even_rank) - 1  # the largest rank that saves parameters
    while top > 1 and not saves_parameters(top, *_dims(shape)):
        top -= 1
    if top < 1 or min_keep * shape.break_even_rank > top:
        return None  # factorizing saves nothing, or the floor asks for more than factors hold
    min_rank = max(1, math.ceil(min_keep * shape.break_even_rank - 1e-9))
    max_rank = max(min_rank, min(top, int(max_keep * shape.break_even_rank + 1e-9)))
    return _Curve(shape, gains.double(), min_rank, max_rank, max_keep >= 1.0)


def allocate_importance(
    shapes: list[LayerShape],
    gains: dict[str, torch.Tensor],
    ratio: float,
    overrides: list[LayerOverride] | None = None,
) -> dict[str, int | None]:
    """Ranks that minimise the estimated total loss increase under one parameter budget.

    `gains[name][i]` is the estimated loss removed by keeping the layer's i-th singular component
    (importance weight x squared singular value: decreasing in i). Every free layer starts at its
    minimum rank (1 unless `min_keep`); then single steps are bought in decreasing order of loss
    removed per parameter until the budget, (1 - ratio) of the targeted parameters, is spent. The
    step past a layer's largest useful rank is "keep it dense" (its remaining loss for the rest of
    the dense size). Because each layer's gains decrease, this greedy is the exact solution of the
    relaxed (fractional) problem; ties break by layer order, so it is deterministic.
    """
    check_ratio(ratio)
    ranks: dict[str, int | None] = {}
    curves: list[_Curve] = []
    budget = (1.0 - ratio) * sum(s.dense_params for s in shapes)
    for shape in shapes:
        curve = _curve(shape, gains[shape.name], matching_override(shape.name, overrides or []))
        if isinstance(curve, _Curve):
            curves.append(curve)
            ranks[shape.name] = curve.min_rank
            budget -= shape.factor_params(curve.min_rank)
        else:
            ranks[shape.name] = curve
            budget -= shape.dense_params if curve is None else shape.factor_params(curve)
    if budget < 0:
        raise RatioError(
            f"ratio {ratio} cannot be met: fixed layers and minimum ranks already exceed it"
        )
    for index in _steps_by_value(curves):
        curve = curves[index]
        name = curve.shape.name
        rank = ranks[name]
        if rank is None or (rank >= curve.max_rank and not curve.may_densify):
            continue  # this layer is closed
        cost = (
            curve.shape.factor_params(1)
            if rank < curve.max_rank
            else curve.shape.dense_params - curve.shape.factor_params(rank)
        )
        if cost > budget:
            curve.max_rank, curve.may_densify = rank, False  # close: later steps are worth less
            continue
        budget -= cost
        ranks[name] = rank + 1 if rank < curve.max_rank else None
    return ranks


def _steps_by_value(curves: list[_Curve]) -> list[int]:
    """Layer index of every purchasable step, best loss-per-parameter first.

    Each layer's steps appear in its own order (its gains decrease; the dense step's value is
    capped at the last component's), so consuming the list in order buys each layer's steps
    in sequence.
    """
    values: list[torch.Tensor] = []
    owners: list[torch.Tensor] = []
    for index, curve in enumerate(curves):
        steps = curve.gains[curve.min_rank : curve.max_rank] / curve.shape.factor_params(1)
        if curve.may_densify:
            rest = curve.gains[curve.max_rank :].sum()
            extra = curve.shape.dense_params - curve.shape.factor_params(curve.max_rank)
            last = steps[-1:] if len(steps) else rest.new_full((1,), float("inf"))
            steps = torch.cat([steps, torch.minimum((rest / extra).reshape(1), last)])
        steps = torch.cummin(steps, dim=0).values  # guard: keep each layer's order
        values.append(steps)
        owners.append(torch.full((len(steps),), index, dtype=torch.long))
    if not values:
        return []
    value = torch.cat(values)
    owner = torch.cat(owners)
    order = torch.sort(-value, stable=True).indices
    return owner[order].tolist()
