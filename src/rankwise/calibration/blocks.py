"""Run a model one block at a time over all calibration windows.

The inputs of block k are kept in memory (count x seq_len x hidden, in the calibration dtype), so
statistics for block k can be gathered and block k compressed before block k+1 runs; sequential
calibration (staged.py) also feeds block k+1 the compressed block's outputs, as GPTQ/SparseGPT-style
pipelines do.
Only one block is converted to the calibration dtype at a time, and only one block's statistics
are live: memory stays bounded for models larger than a full converted copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache

from rankwise.core.errors import CalibrationError
from rankwise.model.memory import release_freed_memory
from rankwise.model.modules import cast_copy


class StopForward(Exception):
    """Raised by a capture hook once the inputs it waits for are known."""


@dataclass
class BlockInputs:
    """What block 0 is called with, for each batch: hidden states and the other arguments."""

    hidden: list[torch.Tensor]  # per batch: (batch, seq, hidden)
    args: list[tuple]  # per batch: positional arguments after the hidden states
    kwargs: list[dict[str, object]]


def find_blocks(model: nn.Module, names: list[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList whose children hold the targets (model.layers, transformer.h, ...)."""
    for list_name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        prefix = re.escape(list_name) + r"\.\d+\."
        if all(re.match(prefix, n) for n in names):
            return list_name, module
    raise CalibrationError("targets do not all sit inside one list of blocks")


def in_one_block_list(model: nn.Module, names: list[str]) -> bool:
    try:
        find_blocks(model, names)
    except CalibrationError:
        return False
    return True


def _cast(value: object, dtype: torch.dtype, device: torch.device | None = None) -> object:
    """A block argument in the compute dtype, on the execution device."""
    if isinstance(value, Cache):
        # a key/value cache handed over positionally (GPT-2's layer_past): if kept, each later run
        # of a block would attend to the keys its earlier runs left there
        return None
    if isinstance(value, torch.Tensor):
        value = value.to(device) if device is not None else value
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype, device) for v in value)
    return value


def run_until(
    model: nn.Module,
    module: nn.Module,
    on_input: Callable[[tuple, dict], None],
    windows: torch.Tensor,
    batch_size: int,
    inference: bool = True,
) -> None:
    """Run the model on each batch of windows until `module` is called: `on_input(args,
    kwargs)` sees what it receives, and the rest of the forward is skipped."""

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        on_input(args, kwargs)
        raise StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            for start in range(0, len(windows), batch_size):
                try:
                    model(input_ids=windows[start : start + batch_size])
                except StopForward:
                    pass
    finally:
        handle.remove()


def capture_inputs(
    model: nn.Module,
    first_block: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    dtype: torch.dtype,
    inference: bool = True,
    device: torch.device | None = None,
) -> BlockInputs:
    """Run the model until block 0 for each batch, keeping what block 0 receives (moved to
    `device`, where the blocks will run; the embeddings run where the model is).

    `inference=False` gives ordinary tensors (no graph) that autograd may save later.
    """
    inputs = BlockInputs([], [], [])

    def keep(args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        skip = {"hidden_states", "past_key_values", "past_key_value"}
        inputs.hidden.append(_cast(hidden, dtype, device))
        inputs.args.append(tuple(_cast(a, dtype, device) for a in args[1:]))
        inputs.kwargs.append(
            {k: _cast(v, dtype, device) for k, v in kwargs.items() if k not in skip}
        )

    run_until(model, first_block, keep, windows, batch_size, inference)
    return inputs


def block_output(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def run_blocks(
    model: nn.Module,
    names: list[str],
    windows: torch.Tensor,
    dtype: torch.dtype,
    on_block: Callable[[int, nn.Module, Callable[[], None]], None],
    batch_size: int = 4,
    device: torch.device | None = None,
) -> None:
    """For each block holding targets: `on_block(index, block_copy, run)`.

    `run()` pushes every batch through the block copy (in `dtype`, on `device`: the execution
    device; the model itself stays where it is), so hooks the callback attached
    see the block's inputs; its outputs are the next block's inputs, whatever the callback does
    to the original block afterwards (one pass; sequential runs are staged.py's).
    """
    list_name, blocks = find_blocks(model, names)
    used = used_blocks(model, names)
    inputs = capture_inputs(model, blocks[0], windows, batch_size, dtype, device=device)
    hidden = inputs.hidden
    with torch.inference_mode():
        for index in range(used[-1] + 1):
            release_freed_memory()  # the last block's copies, grams and outputs
            block = cast_copy(blocks[index], dtype, device)
            outputs: list[torch.Tensor] = []

            def run(
                block: nn.Module = block,
                outputs: list[torch.Tensor] = outputs,
                hidden: list[torch.Tensor] = hidden,
            ) -> None:
                outputs[:] = forward_all(block, hidden, inputs)

            if index in used:
                on_block(index, block, run)
            if not outputs:
                run()
            hidden = outputs


def forward_all(
    block: nn.Module, hidden: list[torch.Tensor], inputs: BlockInputs
) -> list[torch.Tensor]:
    return [
        block_output(block(h, *args, **kwargs))
        for h, args, kwargs in zip(hidden, inputs.args, inputs.kwargs, strict=True)
    ]


def used_blocks(model: nn.Module, names: list[str]) -> list[int]:
    """Indices of the blocks that hold targets."""
    list_name, _ = find_blocks(model, names)
    pattern = re.escape(list_name) + r"\.(\d+)\."
    return sorted({int(re.match(pattern, n).group(1)) for n in names})
