"""`rankwise compress`: load, compress, (recover,) save, optionally evaluate.

The recipe's flags are made from its fields (cli/flags.py); `--recipe r.yaml` loads a recipe and
the flags given override it. The options written here are the run's, not the recipe's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from rankwise.cli import output
from rankwise.cli.evaluate import (
    dense_perplexity,
    eval_token_windows,
    measure_perplexity,
    run_encoder_eval,
    store_eval,
)
from rankwise.cli.flags import recipe_command, recipe_from_flags
from rankwise.cli.recover import recover_model
from rankwise.core import parallel
from rankwise.core.errors import ModelNotFoundError
from rankwise.core.hardware import resolve_device
from rankwise.core.progress import Reporter, cli_reporter
from rankwise.core.recipe import Recipe
from rankwise.data import corpora
from rankwise.evaluation.encoder import is_encoder
from rankwise.methods import get_method
from rankwise.model.accounting import fp32_bytes
from rankwise.pipeline.checkpoint import CompressCheckpoint
from rankwise.pipeline.compress import compress
from rankwise.report.tables import summary_table
from rankwise.storage.saved import check_output, directory_bytes
from rankwise.storage.sources import BUNDLED, load_model


@recipe_command()
def compress_command(
    model: Annotated[str, typer.Argument(help=Recipe.model_fields["model"].description)],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    recipe: Annotated[Path | None, typer.Option(help="recipe YAML; flags override it")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="measure perplexity")] = False,
    eval_windows: Annotated[int, typer.Option(help="windows per eval stream")] = 40,
    json_out: Annotated[Path | None, typer.Option("--json", help="write figures as JSON")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="allow model code from the dir")] = False,
    resume: Annotated[
        bool,
        typer.Option(help="continue an interrupted run: from its last finished block (and step)"),
    ] = False,
    **flags: Any,
) -> None:
    """Compress MODEL and write a loadable directory to --out."""
    base = Recipe.from_yaml(recipe) if recipe else Recipe()
    chosen = recipe_from_flags(base, flags, model=model)
    figures = run_compress(
        chosen, out, overwrite, evaluate, eval_windows, trust_remote_code, resume
    )
    if json_out and figures:  # under torchrun, rank 0's figures alone
        json_out.write_text(json.dumps(figures, indent=2))


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_before_loading(recipe: Recipe) -> None:
    """Everything in the recipe that can be checked without the model: a mistake in an option
    or a file is reported in a second, not after the model was loaded."""
    if recipe.model not in BUNDLED and not Path(recipe.model).expanduser().exists():
        raise ModelNotFoundError(f"model not found: {recipe.model}")
    get_method(recipe.method)
    for source in {recipe.calib, recipe.recover.calib} - {None, *corpora.EVAL_STREAMS}:
        corpora.read_user_text(source)


def run_compress(
    recipe: Recipe,
    out: Path,
    overwrite: bool = False,
    with_eval: bool = False,
    eval_windows: int = 40,
    trust_remote_code: bool = False,
    resume: bool = False,
) -> dict[str, object]:
    """Load, compress, (recover,) save, optionally evaluate; print the summary; return figures."""
    import rankwise

    out = check_output(out, overwrite)  # before any work: nothing is written on bad input
    check_before_loading(recipe)
    # under torchrun: join the process group; rank 0 alone prints, recovers, saves, evaluates
    world = parallel.start(resolve_device(recipe.device))
    reporter = cli_reporter() if world.is_main else Reporter()
    streams = list(corpora.EVAL_STREAMS)
    start = time.perf_counter()
    with reporter.task(f"loading {recipe.model}") as advance:
        loaded = load_model(recipe.model, trust_remote_code)
        advance(1)
    load_seconds = time.perf_counter() - start
    encoder_eval = with_eval and is_encoder(loaded.model)  # no perplexity: embeddings instead
    with_eval = with_eval and not encoder_eval and world.is_main
    eval_tokens = eval_token_windows(loaded, streams, eval_windows) if with_eval else {}
    dense_ppl = dense_perplexity(loaded, recipe.model, eval_tokens, reporter) if with_eval else {}
    if recipe.dtype == "auto":  # every source loads in float32: save in the source's dtype
        recipe = recipe.merged(dtype=loaded.dtype)
    checkpoint = CompressCheckpoint.beside(out)
    if not resume and world.is_main:
        checkpoint.clear()
    start = time.perf_counter()
    result = compress(
        loaded.model, recipe, loaded.tokenizer, reporter=reporter, checkpoint=checkpoint
    )
    parallel.stop()  # every rank holds the same compressed model now
    if not world.is_main:
        return {}
    if recipe.recover.steps:

        def teacher() -> object:  # loaded when needed, freed after (see recover.recover)
            return load_model(recipe.model, trust_remote_code).model

        result.recovery = recover_model(
            loaded.model, teacher, recipe, loaded.tokenizer, out, resume, reporter
        )
    saved = rankwise.save(result, str(out), loaded.tokenizer, overwrite=overwrite)
    checkpoint.clear()  # the model is complete: nothing left to resume
    compress_seconds = time.perf_counter() - start
    compress_peak_mb = peak_memory_mb()  # before the compressed model is evaluated
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    reporter.log(f"load {load_seconds:.1f}s, {phases}, total with save {compress_seconds:.1f}s")
    compressed_ppl = measure_perplexity(loaded, eval_tokens, reporter) if with_eval else {}
    figures = {
        "recipe": recipe.model_dump(mode="json"),
        "out": saved,
        "dense": {
            "name": "dense",
            "params": result.model_params_before,
            "bytes": fp32_bytes(result.model_params_before),
            "perplexity": dense_ppl,
        },
        "compressed": {
            "name": f"{recipe.method} {recipe.ratio:g}",
            "params": result.model_params_after,
            "targeted_ratio": result.targeted_ratio,
            "model_ratio": result.model_ratio,
            "bytes": directory_bytes(saved),
            "perplexity": compressed_ppl,
            "seconds": compress_seconds,
            "phases": result.seconds,
            "load_seconds": load_seconds,
            "peak_memory_mb": compress_peak_mb,
            "recovery": result.recovery,
        },
    }
    output.stdout().print(
        summary_table([figures["dense"], figures["compressed"]], streams if with_eval else [])
    )
    output.stdout().print(f"saved to {saved}")
    if encoder_eval:
        figures["encoder"] = run_encoder_eval(load_model(str(saved)), str(saved), recipe.model)
    if with_eval:
        stored = {**figures["compressed"], "name": saved, "windows": eval_windows}
        store_eval(Path(saved), {**stored, "dense_perplexity": dense_ppl}, reporter)
    return figures
