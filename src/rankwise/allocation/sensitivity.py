"""Measured sensitivity: the loss increase of truncating one layer alone, to correct the estimate.

Why. The Fisher estimate (importance.py) is second order around one model, one layer at a time.
At high ratios the chosen ranks are far outside that regime. Measured on SmolLM2-135M at 0.6:
truncating a late MLP matrix to its planned rank raises the loss 10-40x more than the estimate
says, while many attention matrices cost far less than estimated
(bench/results/allocation.md). So a measurement pass truncates each target alone to its planned
rank, the others dense, and measures the loss increase on a few windows. It then rescales that
layer's loss-versus-rank curve by measured / estimated at that rank, and the allocator runs again.
Each pass adds one measured rank per layer; between measured ranks the scale is log-linear in
rank, and it is held beyond them.

Cost: per target, one factorization (whitened grams of the dense model on the importance
windows) and one forward from the target's block to the logits on `measure_samples` windows;
about 400 s a pass on the default model (210 targets, 4 windows of 512 tokens).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
from torch import nn

from rankwise.allocation import importance
from rankwise.calibration import statistics
from rankwise.calibration.blocks import BlockInputs, capture_inputs, find_blocks, forward_all
from rankwise.calibration.lm_loss import final_head, sliced_loss
from rankwise.calibration.run import CalibrationRun
from rankwise.calibration.statistics import Progress
from rankwise.methods import LayerStats
from rankwise.methods.curves import rescale_tails
from rankwise.model.accounting import LayerShape
from rankwise.model.layers import factored_layer
from rankwise.model.modules import cast_copy, linear_weight, set_module

# measured / estimated ratios are clipped to this factor of their median: a loss increase at
# the noise level of a few windows (or below zero) must not make a layer free or sacred
RATIO_CLIP = 20.0
# where a layer the plan keeps dense is measured, as a fraction of its break-even rank
DENSE_PROBE_KEEP = 0.6


class TailLoss:
    """The model's mean token loss on fixed windows, recomputed from any block onwards.

    The dense inputs of every block are kept (one copy per block of `windows` hidden states),
    so a change inside block k costs a forward through blocks k.. and the LM head only.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        windows: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        self.runner = cast_copy(model, dtype, device)
        self.windows = windows.to(device) if device is not None else windows
        _, self.blocks = find_blocks(self.runner, names)
        self.inputs: BlockInputs = capture_inputs(
            self.runner, self.blocks[0], self.windows, len(windows), dtype
        )
        self.head = final_head(self.runner)
        self.hidden = [self.inputs.hidden]
        with torch.inference_mode():
            for block in self.blocks:
                self.hidden.append(forward_all(block, self.hidden[-1], self.inputs))
        self.base = self.loss_from(len(self.blocks))

    def loss_from(self, index: int) -> float:
        """Mean next-token loss with the blocks from `index` on recomputed as they are now."""
        with torch.inference_mode():
            hidden = self.hidden[index]
            for block in self.blocks[index:]:
                hidden = forward_all(block, hidden, self.inputs)
            total, _ = sliced_loss(self.head, hidden[0], self.windows)
        return total / (self.windows.shape[0] * (self.windows.shape[1] - 1))


def probe_rank(rank: int | None, out_features: int, in_features: int) -> int:
    """The rank a layer is measured at: its planned one, or part of break-even if kept dense."""
    if rank is not None:
        return rank
    break_even = LayerShape("", out_features, in_features).break_even_rank
    return max(1, round(DENSE_PROBE_KEEP * break_even))


def single_layer_losses(
    run: CalibrationRun,
    ranks: dict[str, int | None],
    progress: Progress | None = None,
    known: Mapping[str, Collection[int]] | None = None,
) -> dict[str, tuple[int, float]]:
    """Per target: (rank, loss increase of truncating that target alone to rank) on the dense
    model, scored on the run's measure windows. Factors come from the dense grams on its
    importance windows, one block at a time. Targets whose probe rank is in `known[name]`
    (measured by an earlier pass) are skipped."""
    known = known or {}
    model, names, dtype = run.model, run.names, run.dtype
    tail = TailLoss(model, names, run.measure_windows(), dtype, run.device)
    list_name, _ = find_blocks(model, names)
    measured: dict[str, tuple[int, float]] = {}

    def after_block(block_names: list[str], block_stats: dict[str, LayerStats]) -> None:
        for name in block_names:
            weight = linear_weight(model.get_submodule(name)).to(run.device)
            rank = probe_rank(ranks[name], *weight.shape)
            if rank in known.get(name, ()):
                continue
            factors = run.method.factorize(weight, block_stats[name], rank, run.options)
            original = tail.runner.get_submodule(name)
            bias = None if original.bias is None else original.bias.detach()
            trial = factored_layer(factors.left, factors.right, factors.sparse, bias)
            set_module(tail.runner, name, trial.to(dtype))
            try:
                index = int(name[len(list_name) + 1 :].split(".")[0])
                measured[name] = (rank, tail.loss_from(index) - tail.base)
            finally:
                set_module(tail.runner, name, original)

    statistics.collect_grams(
        model,
        names,
        run.importance_windows(),
        dtype,
        progress,
        after_block=after_block,
        output_grams=run.method.output_grams,
        device=run.device,
    )
    return measured


def calibrated_gains(
    gains: dict[str, torch.Tensor], measured: dict[str, dict[int, float]]
) -> dict[str, torch.Tensor]:
    """Each layer's gains rescaled so its estimated loss at every measured rank is the measured
    one, log-linear in rank between measured ranks, held beyond. Ratios are clipped to
    `RATIO_CLIP` of their median; a layer with no measurement keeps the median ratio."""
    ratios = {
        name: {
            rank: max(loss, 1e-9) / max(importance.estimated_loss(gains[name], rank), 1e-30)
            for rank, loss in points.items()
        }
        for name, points in measured.items()
    }
    every = sorted(r for points in ratios.values() for r in points.values())
    median = every[len(every) // 2] if every else 1.0
    calibrated = {}
    for name, layer_gains in gains.items():
        points = ratios.get(name) or {0: median}
        ranks = sorted(points)
        clipped = [min(max(points[r], median / RATIO_CLIP), median * RATIO_CLIP) for r in ranks]
        calibrated[name] = rescale_tails(layer_gains, ranks, [math.log(c) for c in clipped])
    return calibrated
