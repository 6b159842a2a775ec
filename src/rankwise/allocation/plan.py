"""Rank planning for one compression run: uniform, or importance (spectra x output Fisher).

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

from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.allocation import importance, sensitivity
from rankwise.allocation.budget import allocate_importance, allocate_uniform
from rankwise.calibration import statistics
from rankwise.calibration.statistics import Statistics
from rankwise.core.hardware import compute_dtype
from rankwise.core.progress import Reporter, Timer
from rankwise.core.recipe import Recipe
from rankwise.methods import LayerStats, Method, MethodOptions
from rankwise.model.accounting import LayerShape
from rankwise.model.memory import release_freed_memory
from rankwise.model.modules import set_module

# from this ratio on, the run suggests the measured passes
HIGH_RATIO = 0.5


@dataclass
class Plan:
    """Chooses ranks (uniform, or importance from spectra and output Fisher) for one run."""

    model: nn.Module
    names: list[str]
    shapes: dict[str, LayerShape]
    method: Method
    recipe: Recipe
    reporter: Reporter
    timer: Timer
    gains: dict[str, torch.Tensor] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    estimated: dict[str, torch.Tensor] = field(default_factory=dict)  # gains before measuring
    measured: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> rank -> loss

    def ranks(
        self, stats: Statistics | None = None, windows: torch.Tensor | None = None
    ) -> dict[str, int | None]:
        """With `stats` (one pass) spectra come from them; else from a dense blockwise pass."""
        recipe = self.recipe
        if recipe.allocation == "uniform":
            with self.timer.phase("allocate"):
                return allocate_uniform(list(self.shapes.values()), recipe.ratio, recipe.overrides)
        options = MethodOptions(eig_floor=recipe.eig_floor)
        if stats is None:
            stats, self.spectra = self._importance_statistics(windows, options)
        else:
            with self.timer.phase("spectra"):
                self.spectra = importance.spectra_from_stats(
                    self.model, self.names, self.method, stats, options
                )
        fisher = {n: stats.layers[n].output_fisher for n in self.names}
        if recipe.ratio >= HIGH_RATIO and not recipe.importance_measure:
            self.reporter.log(
                f"at ratio {recipe.ratio} the estimate alone is far from the measured loss: "
                "--importance-rounds 2 --importance-measure 2 measured much better at 0.6 "
                "(about 4x the time; bench/results/allocation.md)"
            )
        return self._allocate(fisher)

    def rounds(self) -> int:
        """How many times the model is compressed: importance rounds need the LM Fisher."""
        return self.recipe.importance_rounds if needs_output_fisher(self.recipe) else 1

    def reallocate(self, windows: torch.Tensor, round_: int) -> dict[str, int | None]:
        """Ranks from the output Fisher of the model as compressed now (same spectra)."""
        subset = importance.importance_windows(self.recipe, windows)
        dtype = compute_dtype(self.recipe.calib_dtype)
        with self.reporter.task(f"importance round {round_}", total=len(subset)) as advance:
            with self.timer.phase(f"importance fisher round {round_}"):
                fisher = statistics.collect_output_fisher(
                    self.model, self.names, subset, dtype, advance
                )
        return self._allocate(fisher)

    def _allocate(self, fisher: dict[str, torch.Tensor | None]) -> dict[str, int | None]:
        with self.timer.phase("allocate"):
            ranks, self.gains = importance.allocate(self.shapes, self.spectra, fisher, self.recipe)
        self.estimated = self.gains
        self.reporter.log(f"importance allocation in {self.timer.seconds['allocate']:.2f} s")
        return ranks

    def measure(self, windows: torch.Tensor, ranks: dict[str, int | None]) -> dict[str, int | None]:
        """`importance_measure` passes on the dense model: each target truncated alone to its
        planned rank, the loss measured, the curves rescaled, the budget allocated again."""
        recipe = self.recipe
        if recipe.allocation != "importance" or not self.estimated:
            return ranks
        options = MethodOptions(eig_floor=recipe.eig_floor)
        gram_windows = importance.importance_windows(recipe, windows)
        loss_windows = importance.measure_windows(recipe, windows)
        dtype = compute_dtype(recipe.calib_dtype)
        blocks = statistics.count_blocks(self.model, self.names)
        for pass_ in range(1, recipe.importance_measure + 1):
            with self.reporter.task(f"measuring importance {pass_}", total=blocks) as advance:
                with self.timer.phase(f"importance measure {pass_}"):
                    found = sensitivity.single_layer_losses(
                        self.model,
                        self.names,
                        self.method,
                        ranks,
                        gram_windows,
                        loss_windows,
                        dtype,
                        options,
                        advance,
                        known=self.measured,
                    )
            for name, (rank, loss) in found.items():
                self.measured.setdefault(name, {})[rank] = loss
            self.gains = sensitivity.calibrated_gains(self.estimated, self.measured)
            ranks = allocate_importance(
                list(self.shapes.values()), self.gains, recipe.ratio, recipe.overrides
            )
        return ranks

    def _importance_statistics(
        self, windows: torch.Tensor, options: MethodOptions
    ) -> tuple[Statistics, dict[str, torch.Tensor]]:
        """Dense spectra and output Fisher on the first `importance_samples` windows."""
        subset = importance.importance_windows(self.recipe, windows)
        dtype = compute_dtype(self.recipe.calib_dtype)
        blocks = statistics.count_blocks(self.model, self.names)
        fisher: dict[str, torch.Tensor] = {}
        want_fisher = needs_output_fisher(self.recipe)
        with self.reporter.task("importance", total=blocks + len(subset) * want_fisher) as advance:
            with self.timer.phase("importance spectra"):
                spectra = importance.spectra_blockwise(
                    self.model, self.names, self.method, subset, dtype, options, advance
                )
            if want_fisher:
                with self.timer.phase("importance fisher"):
                    fisher = statistics.collect_output_fisher(
                        self.model, self.names, subset, dtype, advance
                    )
        release_freed_memory()  # the bf16 copy and logits of the Fisher pass
        stats = Statistics({n: LayerStats(output_fisher=fisher.get(n)) for n in self.names})
        return stats, spectra

    def estimated_loss(self, name: str, rank: int | None) -> float | None:
        if name not in self.gains:
            return None
        return importance.estimated_loss(self.gains[name], rank)


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
