"""What the CLI commands do, apart from argument parsing (so tests can call them directly)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rich.console import Console

from rankwise import data, evaluate
from rankwise.atomic import atomic_write_text
from rankwise.checkpoint import Checkpoints
from rankwise.compress import compress, count_parameters
from rankwise.errors import ModelNotFoundError, RankwiseError
from rankwise.io import (
    EVAL_FILE,
    check_output,
    directory_bytes,
    is_compressed_dir,
    save_compressed,
)
from rankwise.models import BUNDLED, Loaded, cache_dir, load_model
from rankwise.progress import RichReporter
from rankwise.recipe import Recipe
from rankwise.recover import recover
from rankwise.report import layer_table, summary_table

console = Console()


def eval_token_windows(loaded: Loaded, streams: list[str], windows: int) -> dict:
    if loaded.tokenizer is None:
        raise RankwiseError(f"{loaded.source} has no tokenizer: cannot measure perplexity")
    return data.eval_windows(loaded.tokenizer, tuple(streams), count=windows)


def measure_perplexity(
    loaded: Loaded, token_windows: dict, reporter: RichReporter
) -> dict[str, float]:
    results = {}
    for stream, stream_windows in token_windows.items():
        with reporter.task(f"perplexity {stream}", total=len(stream_windows)) as advance:
            results[stream] = evaluate.perplexity(
                loaded.model, stream_windows, advance=advance
            ).perplexity
    return results


def _eval_cache_file(source: str, token_windows: dict) -> Path | None:
    """Dense perplexities are cached, keyed by the model and the exact evaluation tokens."""
    if source not in BUNDLED:
        path = Path(source)
        if not path.exists():
            return None
        source = f"{path.resolve()}:{path.stat().st_mtime_ns}"
    digest = hashlib.sha256(source.encode())
    for stream, ids in sorted(token_windows.items()):
        digest.update(stream.encode())
        digest.update(ids.numpy().tobytes())
    return cache_dir() / "evals" / f"{digest.hexdigest()[:16]}.json"


def dense_perplexity(
    loaded: Loaded, spec: str, token_windows: dict, reporter: RichReporter
) -> dict[str, float]:
    cache = _eval_cache_file(spec, token_windows)
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())
    results = measure_perplexity(loaded, token_windows, reporter)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(results))
    return results


def peak_memory_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bytes_fp32(params: int) -> int:
    return params * 4


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
    if recipe.model not in BUNDLED and not Path(recipe.model).expanduser().exists():
        raise ModelNotFoundError(f"model not found: {recipe.model}")
    reporter = RichReporter()
    streams = list(data.EVAL_STREAMS)
    start = time.perf_counter()
    with reporter.task(f"loading {recipe.model}") as advance:
        loaded = load_model(recipe.model, trust_remote_code)
        advance(1)
    load_seconds = time.perf_counter() - start
    eval_tokens = eval_token_windows(loaded, streams, eval_windows) if with_eval else {}
    dense_ppl = dense_perplexity(loaded, recipe.model, eval_tokens, reporter) if with_eval else {}
    start = time.perf_counter()
    result = compress(loaded.model, recipe, loaded.tokenizer, reporter=reporter)
    if recipe.recover.steps:

        def teacher() -> object:  # loaded when needed, freed after (see recover.recover)
            return load_model(recipe.model, trust_remote_code).model

        result.recovery = recover_model(
            loaded.model, teacher, recipe, loaded.tokenizer, out, resume, reporter
        )
    saved = rankwise.save(result, str(out), loaded.tokenizer, overwrite=overwrite)
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
            "bytes": _bytes_fp32(result.model_params_before),
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
    console.print(
        summary_table([figures["dense"], figures["compressed"]], streams if with_eval else [])
    )
    console.print(f"saved to {saved}")
    if with_eval:
        stored = {**figures["compressed"], "name": saved, "windows": eval_windows}
        store_eval(Path(saved), {**stored, "dense_perplexity": dense_ppl}, reporter)
    return figures


def store_eval(directory: Path, row: dict[str, object], reporter: RichReporter) -> None:
    """Keep the figures next to the model (DIR/eval.json) so `rankwise report` finds them."""
    try:
        atomic_write_text(directory / EVAL_FILE, json.dumps(row, indent=2))
    except OSError as err:
        reporter.log(f"could not store {directory / EVAL_FILE}: {err}")


def run_eval(spec: str, streams: list[str], windows: int, store: bool = True) -> dict[str, object]:
    reporter = RichReporter()
    with reporter.task(f"loading {spec}") as advance:
        loaded = load_model(spec)
        advance(1)
    params = count_parameters(loaded.model)
    path = Path(spec)
    on_disk = directory_bytes(path) if path.is_dir() else _bytes_fp32(params)
    ppl = measure_perplexity(loaded, eval_token_windows(loaded, streams, windows), reporter)
    row = {"name": spec, "params": params, "bytes": on_disk, "perplexity": ppl, "windows": windows}
    if path.is_dir() and is_compressed_dir(path):
        block = json.loads((path / "config.json").read_text())["rankwise"]
        row["targeted_ratio"] = block.get("targeted_ratio")
        row["model_ratio"] = block.get("model_ratio")
        if store:
            store_eval(path, row, reporter)
    console.print(summary_table([row], streams))
    return row


def run_inspect(directory: Path) -> None:
    if not is_compressed_dir(directory):
        raise RankwiseError(f"not a rankwise model directory: {directory}")
    block = json.loads((directory / "config.json").read_text())["rankwise"]
    targets = {t["name"]: t for t in block.get("targets", [])} or block.get("layers", {})
    console.print(layer_table(targets))
    console.print(
        f"method {block.get('method')}, requested ratio {block.get('ratio')}, "
        f"targeted removed {block.get('targeted_ratio', 0):.2%}, "
        f"model removed {block.get('model_ratio', 0):.2%}"
    )


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
    reporter: RichReporter,
) -> dict[str, object]:
    """Distil `teacher` into `student`'s factors on the recipe's recovery windows."""
    settings = recipe.recover
    if tokenizer is None:
        raise RankwiseError("recovery needs a tokenizer to cut its training text")
    source = settings.calib or recipe.calib
    windows = data.calibration_windows(tokenizer, source, settings.windows, settings.seq_len)
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
    recipe_file = Path(directory) / "recipe.yaml"
    recipe = Recipe.from_yaml(recipe_file) if recipe_file.is_file() else Recipe()
    recipe = recipe.merged(recover=settings)
    teacher_spec = teacher_spec or block.get("source_model") or recipe.model
    reporter = RichReporter()
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
    from rankwise.layers import LowRankLinear
    from rankwise.recipe import check_ratio
    from rankwise.truncate import proportional_ranks, truncate_model

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
    recipe_file = Path(directory) / "recipe.yaml"
    recipe = Recipe.from_yaml(recipe_file) if recipe_file.is_file() else Recipe()
    recipe_yaml = recipe.merged(ratio=ratio).to_yaml()
    saved = save_compressed(loaded.model, out, loaded.tokenizer, recipe_yaml, info, overwrite)
    console.print(
        f"targeted removed {block.get('targeted_ratio', 0):.2%} -> {info['targeted_ratio']:.2%}; "
        f"saved to {saved}"
    )
    return info


def run_report(
    directories: list[Path],
    out: Path,
    overwrite: bool = False,
    figure_files: list[Path] | None = None,
    eval_windows: int = 0,
    layers: list[str] | None = None,
) -> Path:
    """Check inputs, measure what was asked (never storing into the inputs), write the page."""
    from rankwise import html_report

    out = check_output(out, overwrite)
    runs = html_report.read_runs(directories)
    others = html_report.attach_figures(runs, html_report.read_figure_files(figure_files or []))
    for run in runs:
        if eval_windows > 0 and not run.figures.get("perplexity"):
            row = run_eval(str(run.directory), list(data.EVAL_STREAMS), eval_windows, store=False)
            run.figures = row
    index = html_report.write_report(runs, out, others, layers)
    console.print(f"report written to {index}")
    return index
