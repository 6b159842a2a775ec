"""`rankwise inspect`: the per-layer table of a compressed directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rankwise.cli import output
from rankwise.core.errors import RankwiseError
from rankwise.report.tables import layer_table
from rankwise.storage.manifest import Manifest
from rankwise.storage.saved import is_compressed_dir


def inspect_command(
    directory: Annotated[Path, typer.Argument(help="compressed model directory")],
) -> None:
    """Per-layer table of a compressed model: shape, rank, kept %, estimated error."""
    run_inspect(directory)


def run_inspect(directory: Path) -> None:
    if not is_compressed_dir(directory):
        raise RankwiseError(f"not a rankwise model directory: {directory}")
    manifest = Manifest.read(directory)
    output.stdout().print(layer_table(manifest.layers))
    output.stdout().print(
        f"method {manifest.method}, requested ratio {manifest.ratio}, "
        f"targeted removed {manifest.targeted_ratio:.2%}, "
        f"model removed {manifest.model_ratio:.2%}"
    )
