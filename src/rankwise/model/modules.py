"""Small nn helpers every stage shares: find and replace submodules, read a linear's weight
(nn.Linear or GPT-2's Conv1D), cast read-only copies, own a loaded model's memory.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def own_memory(model: nn.Module) -> None:
    """Copy every weight out of the file's memory map into the process's own memory.

    A safetensors load leaves the weights as views of one private map of the file: once read,
    its pages stay resident until the last view is gone, so the dense layers a compression
    replaces were never given back (the default run's peak grew by 0.3 GB of new factors on top
    of all 538 MB of the old weights). Copied, each replaced weight is freed with its layer.
    Tied weights stay tied (the shared Parameter gets one copy)."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.data = tensor.data.clone()


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def conv1d_to_linear(module: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D stores weight as (in, out): the same map as a Linear with weight.T."""
    weight = module.weight.detach()  # (in, out)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None)
    linear.weight.data.copy_(weight.T)  # (out, in)
    if module.bias is not None:
        linear.bias.data.copy_(module.bias.detach())
    return linear


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a GPT-2 Conv1D."""
    if is_conv1d(module):
        return module.weight.detach().T
    return module.weight.detach()


def as_linear(module: nn.Module) -> nn.Module:
    return conv1d_to_linear(module) if is_conv1d(module) else module


def cast_copy(
    module: nn.Module, dtype: torch.dtype, device: torch.device | str | None = None
) -> nn.Module:
    """A read-only copy of `module` with its floating tensors in `dtype` (on `device`, the
    execution device, when given), frozen.

    `copy.deepcopy(model).to(dtype)` holds a second full-precision model before converting it
    (+540 MB on the default). Here the converted tensors are made first and handed to deepcopy,
    so only the copy in `dtype` is allocated; tensors already in `dtype` are shared, not
    duplicated (callers swap modules in the copy, they never write its weights). Tied weights
    stay tied: the memo maps each original tensor to one converted tensor.
    """
    memo: dict[int, object] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if id(tensor) in memo:
            continue
        data = tensor.detach()
        if data.is_floating_point():
            data = data.to(dtype)
        if device is not None:
            data = data.to(device)
        if data.is_inference():  # factors made under inference_mode cannot join autograd
            data = data.clone()
        is_param = isinstance(tensor, nn.Parameter)
        memo[id(tensor)] = nn.Parameter(data, requires_grad=False) if is_param else data
    return copy.deepcopy(module, memo).requires_grad_(False)


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied weights stored once (safetensors refuses shared storage)."""
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, tensor in model.state_dict().items():
        pointer = tensor.data_ptr()
        if pointer in seen and tensor.numel() > 0:
            continue
        seen[pointer] = key
        state[key] = tensor.detach().contiguous()
    return state
