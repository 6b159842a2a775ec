"""Save and load compressed models as normal Hugging Face directories.

Layout: `config.json` (with a `rankwise` block, owned by storage/manifest.py), `model.safetensors`
holding the factors, tokenizer files, `recipe.yaml` (docs/saved-format.md).
The directory is written to a temporary sibling and renamed when complete, so an interrupted run
never leaves half a model. Loading builds the architecture from the config (no remote code),
swaps in LowRankLinear where the block says, and loads the safetensors: no pickles anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.core.atomic import atomic_directory
from rankwise.core.errors import ModelNotFoundError, OutputExistsError, OutputNotWritableError
from rankwise.core.hardware import machine_line
from rankwise.model.files import check_weights, read_config
from rankwise.model.layers import LowRankLinear, SparseLowRankLinear
from rankwise.model.loading import Loaded, load_tokenizer, model_class_for
from rankwise.model.modules import linear_weight, set_module, state_for_saving
from rankwise.model.narrow import narrowed_like
from rankwise.storage.manifest import FORMAT_VERSION, LayerEntry, Manifest, MergeDecision
from rankwise.storage.merge import apply_merge_policy, apply_stored_decision, merge_decision

WEIGHTS = "model.safetensors"
EVAL_FILE = "eval.json"  # figures `rankwise eval DIR` stores next to the model, for the report


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing directory (unless overwrite) or an unwritable parent, before any work."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output exists: {out} (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output exists and is not a directory: {out}")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputNotWritableError(f"cannot write to {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise OutputNotWritableError(f"cannot write to {parent}")
    return out


def current_entries(model: nn.Module, entries: list[LayerEntry]) -> list[LayerEntry]:
    """The entries as the model's modules are now: rank, sparse nonzeros and bias are read from
    each targeted module, so a saved manifest can never disagree with the saved tensors."""
    current = []
    for entry in entries:
        module = model.get_submodule(entry.name)
        if isinstance(module, LowRankLinear):
            nnz = module.nnz if isinstance(module, SparseLowRankLinear) else 0
            update = {"rank": module.rank, "nnz": nnz, "bias": module.bias is not None}
        else:
            update = {"rank": None, "nnz": 0, "bias": getattr(module, "bias", None) is not None}
            out, inp = linear_weight(module).shape  # a modular run's narrowed layer: its width
            update["kept_out"] = out if out != entry.out_features else None
            update["kept_in"] = inp if inp != entry.in_features else None
        current.append(entry.model_copy(update=update))
    return current


def layer_from_entry(entry: LayerEntry) -> LowRankLinear:
    """An empty LowRankLinear (or SparseLowRankLinear) shaped as the manifest records it."""
    shape = (entry.in_features, entry.out_features, int(entry.rank or 0))
    if entry.nnz:
        return SparseLowRankLinear(*shape, entry.nnz, bias=entry.bias)
    return LowRankLinear(*shape, bias=entry.bias)


def save_compressed(
    model: nn.Module,
    out: str | Path,
    manifest: Manifest,
    tokenizer: object | None = None,
    recipe_yaml: str | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the model and its manifest to `out` atomically, floating weights in `dtype`.

    The manifest's layers are re-read from the model's modules, and the merge decision is made
    here, once, for every `rankwise.load` of the directory (storage/merge.py)."""
    out = check_output(out, overwrite)
    decision = merge_decision(model, manifest.merge_policy, machine_line())
    manifest = manifest.model_copy(
        update={
            "layers": current_entries(model, manifest.layers),
            "merge": MergeDecision(**decision),
            "version": FORMAT_VERSION,
        }
    )
    state = {
        key: tensor.to(dtype) if tensor.is_floating_point() else tensor
        for key, tensor in state_for_saving(model).items()
    }
    with atomic_directory(out) as tmp:
        model.config.rankwise = manifest.to_block()
        model.config.dtype = dtype  # what transformers reads to load the weights as they are
        model.config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and getattr(model, "can_generate", lambda: False)():
            generation_config.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe_yaml is not None:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
    return out


def is_compressed_dir(path: str | Path) -> bool:
    if not (Path(path) / "config.json").is_file():
        return False
    return "rankwise" in read_config(Path(path))


def load_compressed(path: str | Path, merge_policy: str | None = "never") -> Loaded:
    """Rebuild the architecture, install the factors, load the weights. Eval mode, fp32.

    Then merge: None applies the decision stored when the model was saved (the same modules at
    every load); "auto" decides again by timing on this machine, "always" / "never" merge every
    layer / none. The default "never" keeps the model as stored, so `eval` and `inspect` report
    its parameters as saved.
    """
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
        raise ModelNotFoundError(f"not a rankwise model directory: {path}")
    read_config(path)
    check_weights(path)
    config = AutoConfig.from_pretrained(str(path))
    block = getattr(config, "rankwise", None)
    if not block:
        raise ModelNotFoundError(f"{path} has no rankwise block in config.json")
    manifest = Manifest.from_block(block)
    model_cls = model_class_for(config)
    model = (
        model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    )
    for name, entry in manifest.factorized().items():
        set_module(model, name, layer_from_entry(entry))
    for entry in manifest.layers:  # narrowed dense layers (modular), shaped as saved
        if entry.narrowed and not entry.factorized:
            out, inp = entry.kept_out or entry.out_features, entry.kept_in or entry.in_features
            set_module(model, entry.name, narrowed_like(model.get_submodule(entry.name), out, inp))
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelNotFoundError(
            f"{path}: weights do not match the architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model = model.float().eval()
    if merge_policy is None:
        apply_stored_decision(model, manifest.merge.model_dump() if manifest.merge else None)
    else:
        apply_merge_policy(model, merge_policy)
    return Loaded(model, load_tokenizer(path), str(path))


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that share storage with an earlier key (e.g. lm_head = embedding)."""
    seen: set[int] = set()
    tied = set()
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            tied.add(key)
        seen.add(tensor.data_ptr())
    return tied


def load(path: str | Path, merge_policy: str | None = None) -> nn.Module:
    """`rankwise.load(DIR)`: a transformers model ready for generate, pipeline and lm-eval.

    `merge_policy`: None (the default) applies the decision stored in the directory when it was
    saved, so every load builds the same network; "auto" decides again, timed on this machine
    (~1 s: factors only where faster than dense), "never" keeps every factor, "always" runs all
    dense. Merged layers are plain nn.Linear.
    """
    return load_compressed(path, merge_policy).model


def directory_bytes(path: str | Path) -> int:
    """Bytes of the weight files (safetensors) in a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
