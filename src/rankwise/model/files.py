"""What a model directory holds, checked before anything is loaded from it.

Three failures a user causes by hand, each turned into one line that names the file:
- weights only as pickles (`pytorch_model.bin`, `*.pt`): never unpickled (a pickle can run code,
  and `weights_only=True` still parses it), refused with how to convert them to safetensors;
- a safetensors file cut short (a failed copy): its header names more bytes than the file has;
- a config.json that is not JSON or names no `model_type`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from rankwise.core.errors import ModelNotFoundError, PickleRefusedError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HEADER_LIMIT = 100 * 2**20  # safetensors caps its JSON header at 100 MB

CONVERT_HINT = (
    "convert it once where you trust the file: "
    'python -c "import torch; from safetensors.torch import save_file; '
    "save_file(torch.load('pytorch_model.bin'), 'model.safetensors')\", "
    "or save_pretrained(..., safe_serialization=True)"
)


def read_config(directory: Path) -> dict[str, object]:
    """config.json as a dict, with a one-line error when it is not JSON or names no model type."""
    path = directory / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(
            f"no config.json in {directory}: not a Hugging Face model directory"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelNotFoundError(f"{path} is not valid JSON ({err}): restore the file") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelNotFoundError(
            f"{path} names no model_type: rankwise cannot tell the architecture "
            '(add e.g. "model_type": "llama" as the original model\'s config has it)'
        )
    return config


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header does not parse or whose data is cut short."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < header_len <= min(HEADER_LIMIT, size - 8):
            raise ModelNotFoundError(f"{path} is not a complete safetensors file: copy it again")
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelNotFoundError(f"{path} has a damaged header: copy it again") from None
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        raise ModelNotFoundError(
            f"{path} is truncated ({size:,} of {needed:,} bytes): copy it again or compress again"
        )


def check_weights(directory: Path) -> list[Path]:
    """The directory's safetensors files, each checked complete; pickle-only weights refused."""
    tensors = sorted(directory.glob("*.safetensors"))
    if not tensors:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise PickleRefusedError(
                f"{directory} holds weights only as pickles ({', '.join(pickles)}); rankwise "
                f"loads safetensors only, since unpickling can run code: {CONVERT_HINT}"
            )
        raise ModelNotFoundError(f"no weights (*.safetensors) in {directory}")
    for path in tensors:
        check_safetensors(path)
    return tensors
