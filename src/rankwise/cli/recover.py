"""`rankwise recover` and `rankwise truncate`, and the recovery `compress --recover-steps` runs.

The training loop is in recover.py and the factor math in truncate.py; this module loads the
models, finds the text, keeps the checkpoints beside the output and saves the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rankwise.cli import output
from rankwise.core.errors import RankwiseError
from rankwise.core.hardware import resolve_device
from rankwise.core.progress import Reporter, cli_reporter
from rankwise.core.recipe import Recipe, check_ratio
from rankwise.data import corpora
from rankwise.model.accounting import count_parameters, model_ratio, targeted_totals
from rankwise.model.layers import LowRankLinear
from rankwise.recovery.checkpoint import Checkpoints
from rankwise.recovery.distill import recover
from rankwise.recovery.truncate import fixed_params, proportional_ranks, truncate_model
from rankwise.storage.manifest import Manifest
from rankwise.storage.saved import check_output, save_compressed
from rankwise.storage.sources import load_model


def recover_command(
    directory: Annotated[Path, typer.Argument(help="compressed model directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    steps: Annotated[int, typer.Option(help="distillation steps")] = 200,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="windows per step")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per window")] = None,
    hidden_weight: Annotated[
        float | None, typer.Option(help="weight of last-hidden-state matching")
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    teacher: Annotated[
        str | None, typer.Option(help="teacher model (default: the directory's source model)")
    ] = None,
    teacher_topk: Annotated[
        int | None, typer.Option(help="precompute the teacher's top-k logits to disk (0: live)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the loss log")] = None,
) -> None:
    """Distil the source model into DIRECTORY's factors and write the result to --out."""
    settings = {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "hidden_weight": hidden_weight,
        "checkpoint_every": checkpoint_every,
        "teacher_topk": teacher_topk,
    }
    log = run_recover(directory, out, settings, overwrite, resume, teacher)
    if json_out:
        json_out.write_text(json.dumps(log, indent=2))


def truncate_command(
    directory: Annotated[Path, typer.Argument(help="compressed (e.g. recovered) directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    ratio: Annotated[float, typer.Option(help="new fraction of targeted params removed")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Re-factorize every factor pair to a lower rank (same shape of allocation)."""
    run_truncate(directory, out, ratio, overwrite)


def saved_recipe(directory: str | Path) -> Recipe:
    """The recipe a compressed directory was made with (the default one if it has none)."""
    recipe_file = Path(directory) / "recipe.yaml"
    return Recipe.from_yaml(recipe_file) if recipe_file.is_file() else Recipe()


def checkpoints_for(out: Path, recipe: Recipe) -> Checkpoints:
    """Checkpoints live beside the output (`.NAME.recover`) until the model is saved."""
    fingerprint = recipe.model_dump(mode="json", exclude={"stats"})
    fingerprint["recover"].pop("checkpoint_every")
    return Checkpoints(out.parent / f".{out.name}.recover", fingerprint)


def recover_model(
    student: object,
    teacher: object,
    recipe: Recipe,
    tokenizer: object,
    out: Path,
    resume: bool,
    reporter: Reporter,
) -> dict[str, object]:
    """Distil `teacher` into `student`'s factors on the recipe's recovery windows."""
    settings = recipe.recover
    if tokenizer is None:
        raise RankwiseError("recovery needs a tokenizer to cut its training text")
    source = settings.calib or recipe.calib
    windows = corpora.calibration_windows(tokenizer, source, settings.windows, settings.seq_len)
    checkpoints = checkpoints_for(out, recipe)
    if not resume:
        checkpoints.clear()
    device = resolve_device(recipe.device)
    log = recover(student, teacher, windows, settings, reporter, checkpoints, device=device)
    checkpoints.clear()
    reporter.log(
        f"recovery: {settings.steps} steps in {log.seconds:.1f}s "
        f"({log.tokens_per_second:.0f} tok/s), loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f}"
    )
    return {
        "steps": settings.steps,
        "seconds": log.seconds,
        "tokens": log.tokens,
        "first_loss": log.losses[0],
        "final_loss": log.losses[-1],
        "losses": log.losses,
    }


def run_recover(
    directory: Path,
    out: Path,
    settings: dict[str, object],
    overwrite: bool = False,
    resume: bool = False,
    teacher_spec: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, object]:
    """Recover an already compressed directory into a new one (the teacher: its source model)."""
    out = check_output(out, overwrite)
    manifest = Manifest.read(directory)
    recipe = saved_recipe(directory)
    recipe = recipe.merged(recover=settings)
    teacher_spec = teacher_spec or manifest.source_model or recipe.model
    reporter = cli_reporter()
    with reporter.task(f"loading {directory}") as advance:
        student = load_model(str(directory))
        advance(1)

    def teacher() -> object:  # loaded when needed, freed after (see recover.recover)
        return load_model(teacher_spec, trust_remote_code).model

    recovery = recover_model(
        student.model, teacher, recipe, student.tokenizer, out, resume, reporter
    )
    manifest = Manifest.model_validate({**manifest.model_dump(), "recovery": recovery})
    saved = save_compressed(
        student.model, out, manifest, student.tokenizer, recipe.to_yaml(), overwrite
    )
    output.stdout().print(f"saved to {saved}")
    return recovery


def run_truncate(
    directory: Path, out: Path, ratio: float, overwrite: bool = False
) -> dict[str, object]:
    """Truncate a compressed (e.g. recovered) directory to a higher ratio; write it to `out`.

    Every factorized layer keeps the same fraction of its rank; a sparse residual is kept as it
    is and counted (recovery/truncate.py). The manifest's accounting is recomputed from the
    truncated layers (model/accounting.py)."""
    check_ratio(ratio)
    out = check_output(out, overwrite)
    manifest = Manifest.read(directory)
    loaded = load_model(str(directory))
    entries = manifest.by_name()
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)}
    ranks = proportional_ranks(
        layers, manifest.targeted_params_before, fixed_params(entries, layers), ratio
    )
    errors = truncate_model(loaded.model, ranks)
    truncated = [
        entry.model_copy(
            update={
                "rank": ranks[name],
                "rel_error": None,
                "est_loss": None,
                "truncation_error": errors[name],
            }
        )  # fmt: skip
        if name in ranks
        else entry
        for name, entry in entries.items()
    ]
    dense, kept = targeted_totals(entry.count for entry in truncated)
    params = count_parameters(loaded.model)
    manifest = manifest.model_copy(
        update={
            "ratio": ratio,
            "truncated_from": manifest.targeted_ratio,
            "layers": truncated,
            "targeted_params_after": kept,
            "targeted_ratio": 1 - kept / dense,
            "model_params_after": params,
            "model_ratio": model_ratio(manifest.model_params_before, params),
        }
    )
    recipe_yaml = saved_recipe(directory).merged(ratio=ratio).to_yaml()
    saved = save_compressed(loaded.model, out, manifest, loaded.tokenizer, recipe_yaml, overwrite)
    output.stdout().print(
        f"targeted removed {manifest.truncated_from:.2%} -> {manifest.targeted_ratio:.2%}; "
        f"saved to {saved}"
    )
    return manifest.to_block()
