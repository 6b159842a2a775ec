"""Rank planning, pure: an importance estimate in, ranks out.

`plan_ranks(shapes, estimate, recipe)` spends the recipe's budget: uniformly, or by importance
(each target's spectrum weighted by its output Fisher, rescaled by losses measured at given
ranks where there are any). How the estimate is measured (dense spectra, the Fisher of the model
as compressed now, measured sensitivity) is orchestration, in `estimate.py`.

Importance can be planned in rounds (`importance_rounds`). Round 1 weighs every layer by the
output Fisher of the dense model: the loss is linearised where the model starts. At high ratios
the compressed model is far from that point, and the layers the loss is sensitive to there are
not the same ones (measured: bench/results/allocation.md). Round 2 measures the output Fisher on
the model round 1 compressed, allocates again with the same spectra, puts the dense layers back
and compresses again, so the final allocation is linearised where the compressed model actually
is. (A third round, linearised at round 2's model, swung the budget back and measured worse.)

Measurement passes (`importance_measure`, sensitivity.py) then check the estimate where it
matters: each target truncated alone to its planned rank, the loss increase measured, the
layer's curve rescaled to it, and the budget allocated again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from rankwise.allocation import importance, sensitivity
from rankwise.allocation.budget import allocate_importance, allocate_uniform
from rankwise.calibration import statistics
from rankwise.core.progress import Reporter
from rankwise.core.recipe import Recipe
from rankwise.methods import Method
from rankwise.model.accounting import LayerShape
from rankwise.model.modules import set_module

# from this ratio on, the run suggests the measured passes
HIGH_RATIO = 0.5


@dataclass(frozen=True)
class Estimate:
    """What importance allocation knows of each target: its spectrum in the method's metric,
    the output Fisher that turns it into loss, and losses measured at given ranks."""

    spectra: dict[str, torch.Tensor]  # name -> (min(out, in),)
    fisher: dict[str, torch.Tensor | None]  # name -> (out,) output Fisher, or None
    measured: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> rank -> loss

    def with_fisher(self, fisher: dict[str, torch.Tensor | None]) -> Estimate:
        return replace(self, fisher=fisher)

    def with_measured(self, found: dict[str, tuple[int, float]]) -> Estimate:
        measured = {name: dict(points) for name, points in self.measured.items()}
        for name, (rank, loss) in found.items():
            measured.setdefault(name, {})[rank] = loss
        return replace(self, measured=measured)


@dataclass(frozen=True)
class Allocation:
    """Ranks (None: kept dense) and the loss curves they were chosen from (importance only)."""

    ranks: dict[str, int | None]
    gains: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (k,) loss per component

    def estimated_loss(self, name: str, rank: int | None) -> float | None:
        if name not in self.gains:
            return None
        return importance.estimated_loss(self.gains[name], rank)


def plan_ranks(
    shapes: dict[str, LayerShape], estimate: Estimate | None, recipe: Recipe
) -> Allocation:
    """The recipe's budget spent: uniformly, or by the estimate's loss curves (rescaled to the
    measured losses where there are any)."""
    if recipe.allocation == "uniform" or estimate is None:
        return Allocation(allocate_uniform(list(shapes.values()), recipe.ratio, recipe.overrides))
    ranks, gains = importance.allocate(shapes, estimate.spectra, estimate.fisher, recipe)
    if estimate.measured:
        gains = sensitivity.calibrated_gains(gains, estimate.measured)
        ranks = allocate_importance(list(shapes.values()), gains, recipe.ratio, recipe.overrides)
    return Allocation(ranks, gains)


def rounds(recipe: Recipe) -> int:
    """How many times the model is compressed: importance rounds need the LM Fisher."""
    return recipe.importance_rounds if needs_output_fisher(recipe) else 1


def high_ratio_advice(recipe: Recipe) -> str | None:
    if recipe.allocation != "importance" or recipe.ratio < HIGH_RATIO:
        return None
    if recipe.importance_measure:
        return None
    return (
        f"at ratio {recipe.ratio} the estimate alone is far from the measured loss: "
        "--importance-rounds 2 --importance-measure 2 measured much better at 0.6 "
        "(about 4x the time; bench/results/allocation.md)"
    )


def originals(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The target modules as they are now (kept alive so a later round can put them back)."""
    return {name: model.get_submodule(name) for name in names}


def restore(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Put the kept modules back in place of whatever replaced them."""
    for name, module in modules.items():
        set_module(model, name, module)


def allocation_possible(
    model: nn.Module,
    method: Method,
    recipe: Recipe,
    tokenizer: object | None,
    windows: torch.Tensor | None,
    reporter: Reporter,
) -> Recipe:
    """The recipe, with uniform allocation where importance cannot be measured: an encoder has
    no LM loss to weigh layers by; a data-free method called without text has no calibration."""
    if recipe.allocation != "importance":
        return recipe
    if needs_output_fisher(recipe) and not statistics.has_lm_head(model):
        reporter.log("no language-model loss to weigh layers by: uniform allocation")
        return recipe.merged(allocation="uniform")
    no_text = tokenizer is None and windows is None and not recipe.stats
    if no_text and not method.needs:
        reporter.log("no calibration text to measure importance: uniform allocation")
        return recipe.merged(allocation="uniform")
    return recipe


def needs_output_fisher(recipe: Recipe) -> bool:
    return recipe.allocation == "importance" and recipe.importance_estimator == "fisher"
