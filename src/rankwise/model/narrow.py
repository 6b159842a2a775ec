"""Narrowed dense layers: an MLP's pairs of linears found by name, and cut to fewer channels.

A modular run (pipeline/modular.py, math in methods/modular.py) keeps k of an MLP's d_ff
intermediate channels: the expanding linears (gate/up, fc) keep k output rows, the contracting one
(down) k input columns. The narrowed modules are of the dense model's own kind (nn.Linear, GPT-2's
Conv1D), under the same names, so the state dict keeps transformers' parameter names and a model
whose MLPs all have one width is a plain checkpoint of a config with that `intermediate_size`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.core.errors import UnsupportedArchitectureError
from rankwise.model.modules import is_conv1d, linear_weight

# (expanding suffixes, contracting suffix) of an MLP inside a block, by model_type; the pair's
# common prefix is the MLP. The nonlinearity between them acts channel by channel in all of them.
_GLU = (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
_BERT = (("intermediate.dense",), "output.dense")
MLP_PAIRS: dict[str, tuple[tuple[str, ...], str]] = {
    **dict.fromkeys(
        (
            *("llama", "qwen2", "qwen3", "mistral", "smollm3", "olmo2", "granite"),
            *("gemma", "gemma2", "gemma3_text", "gemma3"),
        ),
        _GLU,
    ),
    "gpt2": (("mlp.c_fc",), "mlp.c_proj"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT),
}
# where each config keeps the MLP's width (GPT-2's n_inner: None means 4 x hidden)
WIDTH_KEYS = ("intermediate_size", "n_inner")


@dataclass(frozen=True)
class MLPGroup:
    """One MLP: the linears that make its channels, and the one that reads them."""

    expand: tuple[str, ...]  # full module names (gate, up / fc)
    down: str

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.expand, self.down)


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def mlp_groups(model: nn.Module, names: list[str]) -> list[MLPGroup]:
    """The MLPs whose linears are all among `names`, in model order.

    Raises UnsupportedArchitectureError for families whose MLP pairs are not known."""
    kind = model_type(model)
    if kind not in MLP_PAIRS:
        known = ", ".join(sorted(MLP_PAIRS))
        raise UnsupportedArchitectureError(
            f"method modular does not know the MLP of architecture '{kind}' (known: {known})"
        )
    expand, down = MLP_PAIRS[kind]
    targets = set(names)
    pattern = re.compile(r"(.*\.)?" + re.escape(down) + "$")
    groups = []
    for name in names:
        found = pattern.fullmatch(name)
        if found is None:
            continue
        prefix = found.group(1) or ""
        makers = tuple(prefix + suffix for suffix in expand)
        if all(m in targets for m in makers):
            groups.append(MLPGroup(makers, name))
    return groups


def width_of(model: nn.Module, group: MLPGroup) -> int:
    """d_ff: the MLP's intermediate channels (columns of its down projection)."""
    return linear_weight(model.get_submodule(group.down)).shape[1]


def _resized(module: nn.Module, out_features: int, in_features: int) -> nn.Module:
    """An empty module of `module`'s kind and bias with a new shape (weights uninitialised)."""
    bias = getattr(module, "bias", None) is not None
    dtype = linear_weight(module).dtype
    if is_conv1d(module):  # GPT-2's Conv1D(nf=out, nx=in): weight (in, out), bias (out,)
        new = type(module)(out_features, in_features).to(dtype)
        if not bias:
            new.bias = None
        return new
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def keep_outputs(module: nn.Module, kept: torch.Tensor) -> nn.Module:
    """`module` (nn.Linear or Conv1D) with only the output units `kept` (k,)."""
    weight = linear_weight(module)  # (out, in)
    new = _resized(module, len(kept), weight.shape[1])
    with torch.no_grad():
        _set_weight(new, weight[kept])
        if module.bias is not None:
            new.bias.copy_(module.bias.detach()[kept])
    return new


def with_inputs(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """`module` reading fewer inputs: `weight` (out, k) replaces its weight, the bias is kept."""
    new = _resized(module, weight.shape[0], weight.shape[1])
    with torch.no_grad():
        _set_weight(new, weight)
        if module.bias is not None:
            new.bias.copy_(module.bias.detach())
    return new


def narrowed_like(module: nn.Module, out_features: int, in_features: int) -> nn.Module:
    """An empty module shaped as a saved narrowed layer (loading fills it)."""
    return _resized(module, out_features, in_features)


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy an (out, in) weight into a Linear, or transposed into a Conv1D."""
    module.weight.copy_(weight.T if is_conv1d(module) else weight)


def text_config(config: object) -> object:
    """The config holding the MLP width (a multimodal model's text tower's)."""
    inner = getattr(config, "text_config", None)
    return inner if inner is not None else config


def set_mlp_width(config: object, width: int) -> None:
    """Record one MLP width for every block in the config (`intermediate_size` / `n_inner`)."""
    target = text_config(config)
    for key in WIDTH_KEYS:
        if hasattr(target, key):
            setattr(target, key, width)
            return
    raise UnsupportedArchitectureError(
        f"the config of '{getattr(config, 'model_type', '?')}' has no MLP width to set"
    )
