"""Interpretable features of one MLP's activations, and how much of each a compressed model keeps.

The MLP's hidden activations (the input of its output projection: `down_proj`, GPT-2's
`mlp.c_proj`, BERT's `output.dense`) are gathered on a few windows of text and factorized by
semi-NMF (`seminmf.py`): every token becomes a nonnegative mixture of `k` feature directions,
each a small group of neurons. A feature is then read two ways:
- **in**: the tokens (with their context) that use it most;
- **out**: the tokens it pushes up when written through the output projection, the final norm's
  linear part and the LM head (a logit lens: a direction, not a calibrated prediction).

With a second model (`vs`: typically the compressed one), its activations at the same module on
the same tokens are read in the first model's features (coefficients fitted with the features
fixed); a feature's **kept** figure is the correlation of its coefficients across the two models.
A compressor that keeps the loss but loses a concept shows it here, feature by feature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.analysis.seminmf import (
    FeatureError,
    SemiNMF,
    fit_coefficients,
    semi_nmf,
    svd_relative_error,
)
from rankwise.calibration.blocks import find_blocks, run_until
from rankwise.core.errors import UnsupportedArchitectureError
from rankwise.model.layers import LowRankLinear
from rankwise.model.modules import is_conv1d, linear_weight
from rankwise.model.targets import BLOCK_LINEARS

BATCH = 4  # windows per forward
NEURON_FRACTION = 0.1  # default winner-take-all: each feature keeps a tenth of the neurons
ACTIVE_LEVEL = 0.2  # a token "uses" a feature above this fraction of its largest coefficient


@dataclass(frozen=True)
class FeatureOptions:
    layer: int | None = None  # block index; None: the middle block
    module: str | None = None  # explicit module name (overrides layer)
    features: int = 32
    neurons: int | None = None  # entries kept per feature; None: a tenth of the width; 0: all
    iterations: int = 200
    top: int = 5  # contexts and promoted tokens shown per feature
    context: int = 6  # tokens shown before each top token
    seed: int = 0


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LowRankLinear)) or is_conv1d(module)


def input_width(module: nn.Module) -> int:
    width = getattr(module, "in_features", None)
    return int(width) if width is not None else linear_weight(module).shape[1]


def activation_module(model: nn.Module, options: FeatureOptions) -> str:
    """The module whose input is the MLP activation: `options.module`, or, in block `layer`,
    the built-in target with the widest input (the MLP's output projection)."""
    modules = dict(model.named_modules())
    if options.module is not None:
        if options.module not in modules or not _is_projection(modules[options.module]):
            raise FeatureError(f"no linear layer named {options.module!r} in this model")
        return options.module
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type not in BLOCK_LINEARS:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' has no built-in targets; name the layer with --module"
        )
    pattern = re.compile(BLOCK_LINEARS[model_type])
    names = [n for n, m in modules.items() if pattern.search(n) and _is_projection(m)]
    list_name, blocks = find_blocks(model, names)
    layer = len(blocks) // 2 if options.layer is None else options.layer
    if not 0 <= layer < len(blocks):
        raise FeatureError(f"layer must be in [0, {len(blocks) - 1}]: {layer}")
    in_block = [n for n in names if n.startswith(f"{list_name}.{layer}.")]
    return max(in_block, key=lambda n: input_width(modules[n]))


def collect_activations(model: nn.Module, name: str, windows: torch.Tensor) -> torch.Tensor:
    """(tokens, width) float32 inputs of module `name` over the windows, in token order (each
    forward stops there: later blocks are not needed)."""
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise FeatureError(f"no module named {name!r} in the model to compare")
    captured: list[torch.Tensor] = []

    def keep(args: tuple, kwargs: dict) -> None:
        hidden = args[0]  # (batch, seq, width): linears are called positionally
        captured.append(hidden.reshape(-1, hidden.shape[-1]).float())

    run_until(model, module, keep, windows, BATCH)
    return torch.cat(captured)  # (tokens, width)


def token_contexts(
    tokenizer: object, windows: torch.Tensor, positions: list[int], context: int
) -> list[str]:
    """Each position's token marked [[like this]], after up to `context` tokens of its window
    ("(start)" where the window begins inside that span)."""
    seq_len = windows.shape[1]
    flat = windows.reshape(-1).tolist()
    texts = []
    for position in positions:
        window_start = (position // seq_len) * seq_len
        start = max(position - context, window_start)
        mark = "(start) " if start == window_start else ""
        before = tokenizer.decode(flat[start:position])
        texts.append(f"{mark}{before}[[{tokenizer.decode(flat[position : position + 1])}]]")
    return texts


def final_norm(model: nn.Module, blocks_name: str) -> nn.Module | None:
    """The norm the LM head reads through: the last normalization module outside the blocks
    (Llama's model.norm, GPT-2's transformer.ln_f), or None."""
    found = None
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and not name.startswith(blocks_name + "."):
            found = module
    return found


def promoted_tokens(
    model: nn.Module, name: str, features: torch.Tensor, tokenizer: object, top: int
) -> list[list[str]] | None:
    """Per feature, the tokens its output direction raises most (None without an LM head).

    The direction goes through the final norm's linear part (norm(d) - norm(0): RMSNorm's
    weight, LayerNorm's centring and weight), as the head would see it in the residual."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    # (hidden, width); a LowRankLinear's `weight` is the product of its factors
    weight = linear_weight(model.get_submodule(name)).float()
    if weight.shape[0] != head.weight.shape[1]:
        return None  # the projection does not write the residual stream the head reads
    in_blocks = re.match(r"(.*?)\.\d+\.", name)
    norm = final_norm(model, in_blocks.group(1) if in_blocks else name)
    with torch.no_grad():
        directions = features.float() @ weight.T  # (k, hidden)
        if norm is not None:
            directions = norm(directions) - norm(torch.zeros_like(directions))
        logits = directions @ head.weight.detach().float().T  # (k, vocab)
    ids = logits.topk(top, dim=1).indices.tolist()
    return [[tokenizer.decode([i]) for i in row] for row in ids]


def kept_correlations(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(k,) Pearson correlation of each feature's coefficients across two models' tokens."""
    a = reference.double() - reference.double().mean(dim=0)
    b = other.double() - other.double().mean(dim=0)
    norms = torch.linalg.norm(a, dim=0) * torch.linalg.norm(b, dim=0)
    return ((a * b).sum(dim=0) / norms.clamp(min=1e-30)).float()


def neurons_kept(options: FeatureOptions, width: int) -> int | None:
    if options.neurons == 0:
        return None
    return options.neurons or max(1, round(NEURON_FRACTION * width))


def fit_features(acts: torch.Tensor, options: FeatureOptions) -> SemiNMF:
    neurons = neurons_kept(options, acts.shape[1])
    return semi_nmf(acts, options.features, options.iterations, options.seed, neurons=neurons)


def active_fraction(coefficients: torch.Tensor, level: float = ACTIVE_LEVEL) -> float:
    """Fraction of tokens using a feature at more than `level` of its largest coefficient."""
    return float((coefficients > level * coefficients.max()).float().mean())


def describe(
    model: nn.Module,
    tokenizer: object,
    windows: torch.Tensor,
    name: str,
    fit: SemiNMF,
    options: FeatureOptions,
) -> list[dict[str, object]]:
    """One record per feature: share, top contexts, promoted tokens, top neurons."""
    promoted = promoted_tokens(model, name, fit.features, tokenizer, options.top)
    records = []
    for i in range(fit.features.shape[0]):
        positions = fit.coefficients[:, i].topk(options.top).indices.tolist()
        neurons = fit.features[i].abs().topk(min(options.top, fit.features.shape[1])).indices
        records.append(
            {
                "feature": i,
                "share": float(fit.shares[i]),
                "active_tokens": active_fraction(fit.coefficients[:, i]),
                "contexts": token_contexts(tokenizer, windows, positions, options.context),
                "promotes": promoted[i] if promoted is not None else None,
                "neurons": neurons.tolist(),
            }
        )
    return records


@dataclass(frozen=True)
class Comparison:
    """What a second model keeps of the reference's features on the same tokens."""

    kept: torch.Tensor  # (k,) correlation of each feature's coefficients across the models
    relative_error: float  # of the second model's activations in the reference features
    activation_change: float  # ||acts_other - acts|| / ||acts||


def compare(
    other: nn.Module, name: str, windows: torch.Tensor, acts: torch.Tensor, fit: SemiNMF
) -> Comparison:
    """Read `other`'s activations at module `name` in the reference features `fit`."""
    other_acts = collect_activations(other, name, windows)  # (tokens, width)
    if other_acts.shape != acts.shape:
        raise FeatureError(f"{name} has other widths in the two models: {other_acts.shape}")
    coefficients, error = fit_coefficients(other_acts, fit.features, start=fit.coefficients)
    change = float(torch.linalg.norm(other_acts - acts) / torch.linalg.norm(acts))
    return Comparison(kept_correlations(fit.coefficients, coefficients), error, change)


def analyse(
    model: nn.Module,
    tokenizer: object,
    windows: torch.Tensor,
    options: FeatureOptions,
    other: nn.Module | None = None,
) -> dict[str, object]:
    """Features of `model`'s MLP activations on `windows`; with `other`, what it keeps of them."""
    if tokenizer is None:
        raise FeatureError("reading features needs the model's tokenizer")
    name = activation_module(model, options)
    acts = collect_activations(model, name, windows)  # (tokens, width)
    fit = fit_features(acts, options)
    records = describe(model, tokenizer, windows, name, fit, options)
    figures: dict[str, object] = {
        "module": name,
        "tokens": acts.shape[0],
        "width": acts.shape[1],
        "features": options.features,
        "neurons_per_feature": neurons_kept(options, acts.shape[1]),
        "iterations": len(fit.errors),
        "relative_error": fit.relative_error,
        "svd_relative_error": svd_relative_error(acts, options.features),
        "records": records,
    }
    if other is not None:
        found = compare(other, name, windows, acts, fit)
        for record, value in zip(records, found.kept.tolist(), strict=True):
            record["kept"] = value
        figures["vs_relative_error"] = found.relative_error
        figures["activation_change"] = found.activation_change
    return figures
