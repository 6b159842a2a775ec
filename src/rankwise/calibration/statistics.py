"""Calibration statistics, gathered by hooks in one pass and kept per target.

- `input_gram`: X^T X of the layer's input over all calibration tokens, accumulated in float64
  (each batch's product in float32, summed into the float64 total).
  Layers that share an input tensor (q/k/v, gate/up) share one gram, computed once.
- `output_fisher`: mean squared gradient of the LM loss w.r.t. each target's output units
  (batches of windows; no weight gradients): how much the loss feels an error in that output.
- `fisher`: summed squared gradients of the LM loss w.r.t. each weight, one window at a time
  (the empirical Fisher needs per-sample gradients, not the gradient of a batch).

Statistics are plain tensors keyed by module name: saved as safetensors, reused across ratios.
No activations are stored: memory is bounded by the grams.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankwise.calibration.blocks import find_blocks, run_blocks, used_blocks
from rankwise.calibration.fisher import WholeModelBackward, collect_output_fisher
from rankwise.calibration.grams import GramCollector, narrow_targets
from rankwise.calibration.lm_loss import has_lm_head
from rankwise.core import parallel
from rankwise.core.errors import CalibrationError, RankwiseError
from rankwise.methods.base import LayerStats
from rankwise.model.modules import cast_copy, is_conv1d, linear_weight

Progress = Callable[[int], None]  # called with the number of windows just processed


@dataclass
class Statistics:
    """Per-target calibration statistics, plus what produced them."""

    layers: dict[str, LayerStats] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)

    def has(self, needs: Iterable[str], names: Iterable[str]) -> bool:
        return all(
            name in self.layers and getattr(self.layers[name], need) is not None
            for name in names
            for need in needs
        )

    def to(self, device: torch.device | str) -> Statistics:
        """The statistics on `device`; a gram shared by several targets stays one tensor."""
        moved: dict[int, torch.Tensor] = {}

        def move(value: torch.Tensor | None) -> torch.Tensor | None:
            if value is None:
                return None
            if id(value) not in moved:
                moved[id(value)] = value.to(device)
            return moved[id(value)]

        layers = {
            name: LayerStats(
                input_gram=move(s.input_gram), output_gram=move(s.output_gram), tokens=s.tokens,
                fisher=move(s.fisher), output_fisher=move(s.output_fisher),
            )
            for name, s in self.layers.items()
        }  # fmt: skip
        return Statistics(layers, dict(self.meta))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        index: dict[str, dict[str, object]] = {}
        gram_keys: dict[int, str] = {}
        for name, stats in self.layers.items():
            entry: dict[str, object] = {"tokens": stats.tokens}
            if stats.input_gram is not None:
                key = gram_keys.setdefault(id(stats.input_gram), f"gram.{len(gram_keys)}")
                tensors[key] = stats.input_gram.contiguous()
                entry["input_gram"] = key
            if stats.fisher is not None:
                tensors[f"fisher.{name}"] = stats.fisher.contiguous()
                entry["fisher"] = f"fisher.{name}"
            if stats.output_fisher is not None:
                tensors[f"output_fisher.{name}"] = stats.output_fisher.contiguous()
                entry["output_fisher"] = f"output_fisher.{name}"
            index[name] = entry
        metadata = {"index": json.dumps(index), "meta": json.dumps(self.meta)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise RankwiseError(f"statistics file not found: {path}")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "index" not in metadata:
                raise RankwiseError(f"not a rankwise statistics file: {path}")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        layers = {}
        for name, entry in json.loads(metadata["index"]).items():
            layers[name] = LayerStats(
                input_gram=tensors.get(entry.get("input_gram", "")),
                tokens=int(entry["tokens"]),
                fisher=tensors.get(entry.get("fisher", "")),
                output_fisher=tensors.get(entry.get("output_fisher", "")),
            )
        return cls(layers, json.loads(metadata.get("meta", "{}")))


BlockCallback = Callable[[list[str], dict[str, LayerStats]], None]


def collect_grams(
    model: nn.Module,
    names: list[str],
    windows: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    after_block: BlockCallback | None = None,
    output_grams: bool = False,
    device: torch.device | None = None,
) -> dict[str, LayerStats]:
    """input_gram and token count per target, one block at a time over `windows` (count, seq),
    each block run on `device` (the grams are made there too).
    With `output_grams`, targets narrower out than in get an output_gram instead (GramCollector).

    `after_block(names, stats)` sees each block's statistics as soon as they are complete (it may
    compress the block: the next block's inputs still come from the original one). With
    `after_block`, grams are not kept past their block (the result is empty): memory holds one
    block's statistics.
    """
    try:
        list_name, _ = find_blocks(model, names)
    except CalibrationError:
        if after_block is not None:
            raise
        return collect_grams_whole(model, names, windows, dtype, progress, device=device)
    results: dict[str, LayerStats] = {}

    def on_block(index: int, block: nn.Module, run: Callable[[], None]) -> None:
        prefix = f"{list_name}.{index}."
        local = [n[len(prefix) :] for n in names if n.startswith(prefix)]
        collector = GramCollector(block, local, narrow_targets(block, local, output_grams))
        try:
            run()
        finally:
            collector.remove()
        block_stats = {prefix + n: s for n, s in collector.stats().items()}
        if progress:
            progress(1)
        if after_block is not None:  # the block is compressed or measured, its grams dropped
            after_block(list(block_stats), block_stats)
        else:
            results.update(block_stats)

    run_blocks(model, names, windows, dtype, on_block, device=device)
    return results


def collect_grams_whole(
    model: nn.Module,
    names: list[str],
    windows: torch.Tensor,
    dtype: torch.dtype,
    progress: Progress | None = None,
    batch_size: int = 4,
    device: torch.device | None = None,
) -> dict[str, LayerStats]:
    """Whole-model pass, for targets outside one list of blocks (e.g. explicit `lm_head`)."""
    runner = runner_for(model, dtype, device)
    collector = GramCollector(runner, names)
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                runner(input_ids=windows[start : start + batch_size].to(device))
    finally:
        collector.remove()
    if progress:
        progress(1)
    return collector.stats()


def runner_for(model: nn.Module, dtype: torch.dtype, device: torch.device | None) -> nn.Module:
    """The model itself where it already is in `dtype` on `device`, else a cast copy."""
    here = next(model.parameters()).device
    if dtype == torch.float32 and (device is None or torch.device(device) == here):
        return model
    return cast_copy(model, dtype, device)


def count_blocks(model: nn.Module, names: list[str]) -> int:
    try:
        return len(used_blocks(model, names))
    except CalibrationError:
        return 1


def collect_fisher(
    model: nn.Module, names: list[str], windows: torch.Tensor, progress: Progress | None = None
) -> dict[str, torch.Tensor]:
    """Summed squared gradients of the LM loss (mean over a window's tokens) per target weight,
    one window per backward.

    Each weight's gradient is squared into its total as soon as autograd has accumulated it,
    then dropped, so the gradients of all the targets are never alive together (returning them
    together took 0.4 GB more for a 512-token window of SmolLM2 in bfloat16, and was slower).
    The backward goes through the whole model: the block-at-a-time pass of output_fisher.py
    would save another 0.5 GB of graph and logits, but it costs a second forward per window
    (measured +18% on this pass, the longest of a fwsvd run).
    """
    if not has_lm_head(model):
        raise RankwiseError("Fisher statistics need a language model head (a causal LM)")
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {param: param.requires_grad for param in model.parameters()}
    fisher = {
        n: torch.zeros_like(linear_weight(model.get_submodule(n)), dtype=torch.float32)
        for n in names
    }
    # the backward differentiates each window's summed loss: (d mean / dW)^2 = that / (n - 1)^2
    scale = 1.0 / (windows.shape[1] - 1) ** 2

    def square_into(name: str) -> Callable[[torch.Tensor], None]:
        transposed = is_conv1d(model.get_submodule(name))  # Conv1D stores (in, out)

        def hook(weight: torch.Tensor) -> None:
            grad = weight.grad.T if transposed else weight.grad
            fisher[name].add_(grad.float().square(), alpha=scale)
            weight.grad = None

        return hook

    for param in flags:
        param.requires_grad_(False)
    handles = []
    try:
        for name, weight in weights.items():
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(square_into(name)))
        backward = WholeModelBackward(model)
        device = next(model.parameters()).device
        for index, window in enumerate(windows):
            backward(index, window[None].to(device))  # (1, seq_len)
            if progress:
                progress(1)
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)
    for name in names:  # under torchrun: every rank's windows summed
        parallel.reduce_sum(fisher[name])
    return fisher


def collect(
    model: nn.Module,
    names: list[str],
    windows: torch.Tensor,
    needs: frozenset[str],
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    output_grams: bool = False,
    device: torch.device | None = None,
) -> Statistics:
    """Gather what is `needed` ("input_gram", "fisher", "output_fisher") for every target
    (`output_grams`: narrow targets get an output_gram instead, see GramCollector), running
    on `device` (the statistics are made there)."""
    if len(windows) == 0:
        raise CalibrationError("no calibration windows")
    stats = Statistics(
        meta={
            "windows": len(windows),
            "seq_len": int(windows.shape[1]),
            "dtype": str(dtype).removeprefix("torch."),
        }
    )
    if "input_gram" in needs:
        stats.layers = collect_grams(
            model, names, windows, dtype, progress, None, output_grams, device
        )
    else:
        stats.layers = {n: LayerStats(tokens=windows.numel()) for n in names}
    if "fisher" in needs:
        runner = runner_for(model, dtype, device)
        for name, value in collect_fisher(runner, names, windows, progress).items():
            stats.layers[name].fisher = value
    if "output_fisher" in needs:
        found = collect_output_fisher(model, names, windows, dtype, progress, device=device)
        for name, value in found.items():
            stats.layers[name].output_fisher = value
    return stats.to("cpu")  # every layer's statistics at once: kept where memory is largest
