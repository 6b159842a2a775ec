"""Recovery and truncation commands: `compress --recover-steps`, `recover`, `truncate`.

The training loop is in recover.py and the factor math in truncate.py; this module loads the
models, finds the text, keeps the checkpoints beside the output and saves the result.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from rankwise.core.errors import ModelNotFoundError, RankwiseError
from rankwise.core.progress import Reporter, cli_reporter
from rankwise.core.recipe import Recipe
from rankwise.data import corpora
from rankwise.model.accounting import count_parameters
from rankwise.recovery.checkpoint import Checkpoints
from rankwise.recovery.distill import recover
from rankwise.storage.saved import check_output, is_compressed_dir, save_compressed
from rankwise.storage.sources import load_model

console = Console()


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
    if not is_compressed_dir(directory):
        raise ModelNotFoundError(f"not a rankwise model directory: {directory}")
    block = json.loads((Path(directory) / "config.json").read_text())["rankwise"]
    recipe = saved_recipe(directory)
    recipe = recipe.merged(recover=settings)
    teacher_spec = teacher_spec or block.get("source_model") or recipe.model
    reporter = cli_reporter()
    with reporter.task(f"loading {directory}") as advance:
        student = load_model(str(directory))
        advance(1)

    def teacher() -> object:  # loaded when needed, freed after (see recover.recover)
        return load_model(teacher_spec, trust_remote_code).model

    recovery = recover_model(
        student.model, teacher, recipe, student.tokenizer, out, resume, reporter
    )
    info = {k: v for k, v in block.items() if k not in ("layers", "version")}
    info["recovery"] = {k: v for k, v in recovery.items() if k != "losses"}
    saved = save_compressed(
        student.model, out, student.tokenizer, recipe.to_yaml(), info, overwrite
    )
    console.print(f"saved to {saved}")
    return recovery


def run_truncate(
    directory: Path, out: Path, ratio: float, overwrite: bool = False
) -> dict[str, object]:
    """Truncate a compressed (e.g. recovered) directory to a higher ratio; write it to `out`."""
    from rankwise.core.recipe import check_ratio
    from rankwise.model.layers import LowRankLinear
    from rankwise.recovery.truncate import proportional_ranks, truncate_model

    check_ratio(ratio)
    out = check_output(out, overwrite)
    if not is_compressed_dir(directory):
        raise ModelNotFoundError(f"not a rankwise model directory: {directory}")
    loaded = load_model(str(directory))
    block = json.loads((Path(directory) / "config.json").read_text())["rankwise"]
    targets = {t["name"]: t for t in block["targets"]}
    kept_dense = sum(t["out"] * t["in"] for t in targets.values() if t["rank"] is None)
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)}
    dense_params = int(block["targeted_params_before"])
    ranks = proportional_ranks(layers, dense_params, kept_dense, ratio)
    errors = truncate_model(loaded.model, ranks)
    for name, rank in ranks.items():
        targets[name].update(
            rank=rank, rel_error=None, est_loss=None, truncation_error=errors[name]
        )
    kept = kept_dense + sum(r * (targets[n]["out"] + targets[n]["in"]) for n, r in ranks.items())
    info = {k: v for k, v in block.items() if k not in ("layers", "version")}
    info.update(
        ratio=ratio,
        truncated_from=block.get("targeted_ratio"),
        targets=list(targets.values()),
        targeted_params_after=kept,
        targeted_ratio=1 - kept / dense_params,
        model_params_after=count_parameters(loaded.model),
        model_ratio=1 - count_parameters(loaded.model) / int(block["model_params_before"]),
    )
    recipe = saved_recipe(directory)
    recipe_yaml = recipe.merged(ratio=ratio).to_yaml()
    saved = save_compressed(loaded.model, out, loaded.tokenizer, recipe_yaml, info, overwrite)
    console.print(
        f"targeted removed {block.get('targeted_ratio', 0):.2%} -> {info['targeted_ratio']:.2%}; "
        f"saved to {saved}"
    )
    return info
