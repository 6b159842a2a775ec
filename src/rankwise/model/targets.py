"""Which linears a compression targets: the built-in lists per architecture, or the user's
regexes."""

from __future__ import annotations

import re

from torch import nn

from rankwise.core.errors import UnsupportedArchitectureError
from rankwise.model.modules import is_conv1d

# Built-in targets per model_type: regexes over module names (the linears inside the blocks).
# `(^|\.)`: the blocks sit at the top of a bare base model (LlamaModel: "layers.0...").
_DECODER = r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"


_FUSED_DECODER = r"(^|\.)layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)$"  # Phi-3


# GPT-NeoX (Pythia), Falcon, BLOOM: fused query_key_value, MLP dense_h_to_4h / dense_4h_to_h
_NEOX_LINEARS = r"(attention|self_attention)\.(query_key_value|dense)|mlp\.dense_(h_to_4h|4h_to_h)"


# encoders named like BERT (encoder.layer.N.attention.self.query, ...)
_BERT_STYLE = ("bert", "roberta", "xlm-roberta", "camembert", "electra")


BLOCK_LINEARS = {
    **dict.fromkeys(
        (
            *("llama", "qwen2", "qwen3", "mistral", "smollm3", "olmo2", "granite", "stablelm"),
            *("gemma", "gemma2", "gemma3_text"),
        ),
        _DECODER,
    ),
    "gemma3": r"language_model(\..*)?" + _DECODER,  # the text tower of the multimodal model
    "phi3": _FUSED_DECODER,
    "phi": r"(^|\.)layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|dense)|mlp\.fc[12])$",
    "starcoder2": r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.c_(fc|proj))$",
    "opt": r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc[12])$",
    "gpt_neox": r"(^|\.)layers\.\d+\.(" + _NEOX_LINEARS + r")$",
    **dict.fromkeys(("falcon", "bloom"), r"(^|\.)h\.\d+\.(" + _NEOX_LINEARS + r")$"),
    **dict.fromkeys(
        _BERT_STYLE,
        r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
        r"|intermediate\.dense|output\.dense)$",
    ),
    "mpnet": r"encoder\.layer\.\d+\.(attention\.attn\.(q|k|v|o)|intermediate\.dense"
    r"|output\.dense)$",
    "distilbert": r"transformer\.layer\.\d+\.(attention\.(q|k|v|out)_lin|ffn\.lin[12])$",
    # GPT-2 stores Conv1D (handled as transposed linears); GPT-BigCode the same names as nn.Linear
    **dict.fromkeys(
        ("gpt2", "gpt_bigcode"), r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)$"
    ),
}


# families whose checkpoints are bare encoders (AutoModel) when config.json names no class
ENCODER_TYPES = (*_BERT_STYLE, "mpnet", "distilbert")


def find_targets(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None
) -> list[str]:
    """Names of the linears to compress: the built-in pattern for the model type, or `targets`."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if targets is None:
        if model_type not in BLOCK_LINEARS:
            raise UnsupportedArchitectureError(
                f"architecture '{model_type}' has no built-in targets; pass regexes with "
                "--targets (e.g. --targets 'layers\\.\\d+\\..*proj$')"
            )
        patterns = [BLOCK_LINEARS[model_type]]
    else:
        patterns = targets
    compiled = [re.compile(p) for p in patterns]
    ignored = [re.compile(p) for p in (ignore or [])]
    names = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        if any(p.search(name) for p in compiled) and not any(p.search(name) for p in ignored):
            names.append(name)
    if not names:
        raise UnsupportedArchitectureError(
            f"no linear layer of '{model_type}' matches targets {patterns}"
        )
    return names
