"""Recovery and truncation commands: `compress --recover-steps`, `recover`, `truncate`.

The training loop is in recover.py and the factor math in truncate.py; this module loads the
models, finds the text, keeps the checkpoints beside the output and saves the result.
"""

from __future__ import annotations

from pathlib import Path

from rankwise.cli import output
from rankwise.core.errors import RankwiseError
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
    log = recover(student, teacher, windows, settings, reporter, checkpoints)
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
