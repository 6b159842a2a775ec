"""One parameter budget over curves of different kinds: factor ranks and MLP widths.

A modular run (pipeline/modular.py) compresses attention layers by rank (whiten) and MLPs by
width (channels kept). Both are step curves: a step buys one more rank or one more channel, costs
a fixed number of parameters (`out + in` for a rank; the MLP's row of gate/up plus column of down
for a channel) and removes an estimated loss (`gains[i]`). `spend` is the greedy of
budget.allocate_importance over such curves, whatever their kind: steps bought in decreasing order
of loss removed per parameter, each unit's own order kept (its values made non-increasing), the
step past `max_steps` being "keep it dense". For a width curve that last step is the last channel
(a full-width MLP is the dense one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.core.errors import RatioError


@dataclass(frozen=True)
class StepCurve:
    """One unit of the budget: `steps` kept cost `steps * step_params`, dense `dense_params`."""

    name: str
    gains: torch.Tensor  # (n,) float64: estimated loss removed by step i
    step_params: int
    dense_params: int
    max_steps: int  # the most steps kept before "dense" (rank: the last that saves parameters)
    min_steps: int = 1

    def cost(self, steps: int | None) -> int:
        return self.dense_params if steps is None else steps * self.step_params

    def loss(self, steps: int | None) -> float:
        """Estimated loss of keeping `steps` (None: dense, nothing lost)."""
        return 0.0 if steps is None else float(self.gains[steps:].sum())


def rank_curve(name: str, gains: torch.Tensor, out_features: int, in_features: int) -> StepCurve:
    """A factorized layer's curve: ranks 1 .. the largest that saves parameters, then dense."""
    per_rank = out_features + in_features
    dense = out_features * in_features
    top = max(1, (dense - 1) // per_rank)  # rank * (out + in) < out * in
    return StepCurve(name, gains.double(), per_rank, dense, top)


def width_curve(name: str, gains: torch.Tensor, channel_params: int) -> StepCurve:
    """An MLP's curve: widths 1 .. d_ff - 1, then dense (all d_ff channels)."""
    channels = len(gains)
    return StepCurve(name, gains.double(), channel_params, channels * channel_params, channels - 1)


def spend(curves: list[StepCurve], budget: float) -> dict[str, int | None]:
    """Steps per unit (None: dense) minimising the summed estimated loss within `budget`
    parameters. Every unit starts at `min_steps`; a unit whose next step does not fit is closed
    (its later steps are worth less), as in budget.allocate_importance."""
    steps: dict[str, int | None] = {c.name: c.min_steps for c in curves}
    budget -= sum(c.cost(c.min_steps) for c in curves)
    if budget < 0:
        raise RatioError("the budget cannot be met: the smallest widths and ranks exceed it")
    values: list[torch.Tensor] = []
    owners: list[torch.Tensor] = []
    for index, curve in enumerate(curves):
        step_values = curve.gains[curve.min_steps : curve.max_steps] / curve.step_params
        rest = curve.gains[curve.max_steps :].sum()
        extra = max(curve.dense_params - curve.cost(curve.max_steps), 1)
        last = step_values[-1:] if len(step_values) else rest.new_full((1,), float("inf"))
        step_values = torch.cat([step_values, torch.minimum((rest / extra).reshape(1), last)])
        values.append(torch.cummin(step_values, dim=0).values)
        owners.append(torch.full((len(step_values),), index, dtype=torch.long))
    if not values:
        return steps
    order = torch.sort(-torch.cat(values), stable=True).indices
    closed: set[str] = set()
    for index in torch.cat(owners)[order].tolist():
        curve = curves[index]
        kept = steps[curve.name]
        if kept is None or curve.name in closed:
            continue
        cost = (
            curve.step_params if kept < curve.max_steps else curve.dense_params - curve.cost(kept)
        )
        if cost > budget:
            closed.add(curve.name)
            continue
        budget -= cost
        steps[curve.name] = kept + 1 if kept < curve.max_steps else None
    return steps
