"""Output Fisher: per target, the mean over tokens of (d loss / d output)^2 (importance.py).

Only input gradients are needed (the weights are frozen in a private copy in the calibration
dtype), and each window's loss is summed over its tokens, so a window's gradient does not depend
on the batch it shares.

Memory. Differentiating the whole model keeps the autograd graph of every block (~360 MB for one
512-token window of SmolLM2 in bfloat16) plus all logits and their gradient (~400 MB). Where the
blocks sit in one list, the pass goes a block at a time instead: each window runs forward through
the blocks without a graph, keeping only each block's input (0.6 MB); the head gives the loss
gradient at the last block's output a slice of positions at a time (lm_loss); then each block,
last to first, runs again with a graph and is differentiated alone. One block's graph is alive at
a time, for the price of a second forward through the blocks. Models whose blocks are not in one
list, or whose logits the rebuilt head does not reproduce, are differentiated whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rankwise.calibration.blocks import block_output, capture_inputs, find_blocks, used_blocks
from rankwise.calibration.lm_loss import Head, final_head, has_lm_head, reproduces_loss, sliced_loss
from rankwise.core import parallel
from rankwise.core.errors import CalibrationError, RankwiseError
from rankwise.model.modules import cast_copy

CHECK_LEN = 64  # tokens on which the rebuilt head is checked against the model's own loss


class _Totals:
    """Squares and sums each target output's gradient as the backward pass reaches it, so
    neither all 200 gradients nor their graphs are alive at once."""

    def __init__(self, runner: nn.Module, names: list[str]) -> None:
        device = next(runner.parameters()).device
        self.sums = {n: torch.zeros((), dtype=torch.float64, device=device) for n in names}
        self.reached: set[str] = set()
        self.handles = [
            runner.get_submodule(n).register_forward_hook(self._watch(n)) for n in names
        ]

    def _watch(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if output.requires_grad:  # not in the graph-free forward of the block-wise pass
                output.register_hook(lambda grad: self._add(name, grad))

        return hook

    def _add(self, name: str, grad: torch.Tensor) -> None:
        flat = grad.reshape(-1, grad.shape[-1]).float()  # (tokens, out)
        self.sums[name] = self.sums[name] + flat.square().sum(0).double()
        self.reached.add(name)

    def check_all_reached(self) -> None:
        missing = [n for n in self.sums if n not in self.reached]
        if missing:
            raise CalibrationError(f"the loss does not depend on {missing[0]}")
        self.reached.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class WholeModelBackward:
    """Backward of a batch's summed loss through the model's own forward and loss (gradients
    reach whatever requires them; calibrate.collect_fisher reuses it for weight gradients)."""

    def __init__(self, runner: nn.Module) -> None:
        self.runner = runner

    def __call__(self, index: int, batch: torch.Tensor) -> None:
        embeds = self.runner.get_input_embeddings()(batch).detach().requires_grad_(True)
        loss = self.runner(inputs_embeds=embeds, labels=batch, use_cache=False).loss
        (loss * batch.shape[0] * (batch.shape[1] - 1)).backward()


class _BlockByBlock:
    """Backward of a batch's summed loss with one block's graph alive at a time."""

    def __init__(
        self,
        runner: nn.Module,
        blocks: nn.ModuleList,
        first: int,
        head: Head,
        windows: torch.Tensor,
        batch_size: int,
        dtype: torch.dtype,
    ) -> None:
        self.blocks, self.first, self.head = blocks, first, head
        # the runner is already on the execution device: so are the windows and inputs
        self.inputs = capture_inputs(runner, blocks[0], windows, batch_size, dtype, inference=False)

    def __call__(self, index: int, batch: torch.Tensor) -> None:
        args, kwargs = self.inputs.args[index], self.inputs.kwargs[index]
        block_inputs: list[torch.Tensor] = []
        hidden = self.inputs.hidden[index]  # (batch, seq, hidden)
        with torch.no_grad():
            for block in self.blocks:
                block_inputs.append(hidden)
                hidden = block_output(block(hidden, *args, **kwargs))
        _, grad = sliced_loss(self.head, hidden.requires_grad_(True), batch)
        for position in range(len(self.blocks) - 1, self.first - 1, -1):
            inputs = block_inputs[position].detach().requires_grad_(True)
            output = block_output(self.blocks[position](inputs, *args, **kwargs))
            output.backward(grad)
            grad = inputs.grad


def _backward_pass(
    runner: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int, dtype: torch.dtype
) -> Callable[[int, torch.Tensor], None]:
    """Block by block where the blocks sit in one list and the rebuilt head is the model's."""
    try:
        _, blocks = find_blocks(runner, names)
        head = final_head(runner)
    except CalibrationError:
        return WholeModelBackward(runner)
    if not reproduces_loss(runner, blocks[-1], head, windows[:1, :CHECK_LEN]):
        return WholeModelBackward(runner)
    first = used_blocks(runner, names)[0]
    return _BlockByBlock(runner, blocks, first, head, windows, batch_size, dtype)


def collect_output_fisher(
    model: nn.Module,
    names: list[str],
    windows: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 1,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Per target (out,): mean over tokens of (d summed window loss / d output)^2, float64,
    computed by a copy of the model on `device` (the result comes back to the CPU)."""
    if not has_lm_head(model):
        raise RankwiseError("importance needs a language model head (a causal LM)")
    runner = cast_copy(model, dtype, device)
    windows = windows.to(device) if device is not None else windows
    backward = _backward_pass(runner, names, windows, batch_size, dtype)
    totals = _Totals(runner, names)
    tokens = 0
    try:
        for index, start in enumerate(range(0, len(windows), batch_size)):
            batch = windows[start : start + batch_size]  # (batch, seq)
            backward(index, batch)
            totals.check_all_reached()
            tokens += batch.numel()
            if progress:
                progress(len(batch))
    finally:
        totals.remove()
    # under torchrun: every rank's windows summed, in the same order on every rank
    tokens = parallel.reduce_count(tokens, windows.device)
    return {n: (parallel.reduce_sum(totals.sums[n]) / tokens).cpu() for n in names}
