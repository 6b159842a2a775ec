"""What the CLI commands do, apart from argument parsing (so tests can call them directly)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from rankwise.analysis.features import FeatureOptions
from rankwise.cli import output
from rankwise.cli.recover import recover_model
from rankwise.cli.tasks import run_encoder_eval, size_row
from rankwise.core.atomic import atomic_write_text
from rankwise.core.errors import ModelNotFoundError, RankwiseError
from rankwise.core.progress import Reporter, cli_reporter
from rankwise.core.recipe import Recipe
from rankwise.data import corpora
from rankwise.evaluation import perplexity as evaluate
from rankwise.evaluation.encoder import is_encoder
from rankwise.evaluation.speed import BenchOptions
from rankwise.methods import get_method
from rankwise.model.accounting import fp32_bytes
from rankwise.model.loading import Loaded
from rankwise.pipeline.compress import compress
from rankwise.report.tables import layer_table, summary_table
from rankwise.storage.manifest import Manifest
from rankwise.storage.saved import EVAL_FILE, check_output, directory_bytes, is_compressed_dir
from rankwise.storage.sources import BUNDLED, cache_dir, load_model


def eval_token_windows(loaded: Loaded, streams: list[str], windows: int) -> dict:
    if loaded.tokenizer is None:
        raise RankwiseError(f"{loaded.source} has no tokenizer: cannot measure perplexity")
    return corpora.eval_windows(loaded.tokenizer, tuple(streams), count=windows)


def measure_perplexity(loaded: Loaded, token_windows: dict, reporter: Reporter) -> dict[str, float]:
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
    loaded: Loaded, spec: str, token_windows: dict, reporter: Reporter
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
    reporter = cli_reporter()
    streams = list(corpora.EVAL_STREAMS)
    start = time.perf_counter()
    with reporter.task(f"loading {recipe.model}") as advance:
        loaded = load_model(recipe.model, trust_remote_code)
        advance(1)
    load_seconds = time.perf_counter() - start
    encoder_eval = with_eval and is_encoder(loaded.model)  # no perplexity: embeddings instead
    with_eval = with_eval and not encoder_eval
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


def store_eval(directory: Path, row: dict[str, object], reporter: Reporter) -> None:
    """Keep the figures next to the model (DIR/eval.json) so `rankwise report` finds them."""
    try:
        atomic_write_text(directory / EVAL_FILE, json.dumps(row, indent=2))
    except OSError as err:
        reporter.log(f"could not store {directory / EVAL_FILE}: {err}")


def run_eval(
    spec: str,
    streams: list[str],
    windows: int,
    reference: str | None = None,
    store: bool = True,
) -> dict[str, object]:
    reporter = cli_reporter()
    with reporter.task(f"loading {spec}") as advance:
        loaded = load_model(spec)
        advance(1)
    if is_encoder(loaded.model):  # no LM loss: embedding fidelity and a topic probe instead
        return run_encoder_eval(loaded, spec, reference)
    ppl = measure_perplexity(loaded, eval_token_windows(loaded, streams, windows), reporter)
    row = {**size_row(loaded, spec), "perplexity": ppl, "windows": windows}
    if store and is_compressed_dir(spec):
        store_eval(Path(spec), row, reporter)
    output.stdout().print(summary_table([row], streams))
    return row


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


def run_report(
    directories: list[Path],
    out: Path,
    overwrite: bool = False,
    figure_files: list[Path] | None = None,
    eval_windows: int = 0,
    layers: list[str] | None = None,
) -> Path:
    """Check inputs, measure what was asked (never storing into the inputs), write the page."""
    from rankwise.report import html

    out = check_output(out, overwrite)
    runs = html.read_runs(directories)
    others = html.attach_figures(runs, html.read_figure_files(figure_files or []))
    for run in runs:
        if eval_windows > 0 and not run.figures.get("perplexity"):
            row = run_eval(
                str(run.directory), list(corpora.EVAL_STREAMS), eval_windows, store=False
            )
            run.figures = row
    index = html.write_report(runs, out, others, layers)
    output.stdout().print(f"report written to {index}")
    return index


def run_bench(spec: str, vs: str, options: BenchOptions) -> dict[str, object]:
    """Time SPEC against VS, print the table, return the figures."""
    from rich.table import Table

    from rankwise.evaluation.speed import bench, speed_table

    figures = bench(spec, vs, options)
    header, *rows = speed_table(figures)
    title = f"{spec} vs {vs} ({options.threads} threads, median of {options.repeats})"
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    output.stdout().print(table)
    output.stdout().print(
        f"merge policy {options.merge_policy}: {len(figures['merged_layers'])} layers merged, "
        f"{figures['factorized_layers']} factorized ({figures['policy_seconds']:.1f}s)"
    )
    return figures


def run_features(
    spec: str,
    options: FeatureOptions,
    vs: str | None,
    text: str,
    samples: int,
    seq_len: int,
) -> dict[str, object]:
    """Semi-NMF features of one MLP of SPEC (and what VS keeps of them): table and figures."""
    from rankwise.analysis.features import activation_module, analyse
    from rankwise.report.tables import feature_table

    reporter = cli_reporter()
    with reporter.task(f"loading {spec}" + (f" and {vs}" if vs else "")) as advance:
        loaded = load_model(spec)
        other = load_model(vs).model if vs else None
        advance(1)
    if loaded.tokenizer is None:
        raise RankwiseError(f"{spec} has no tokenizer: features are read through their tokens")
    activation_module(loaded.model, options)  # a bad layer or module fails before any work
    windows = corpora.eval_windows(loaded.tokenizer, (text,), seq_len, samples)[text]  # held out
    with reporter.task("activations and semi-NMF") as advance:
        figures = analyse(loaded.model, loaded.tokenizer, windows, options, other)
        advance(1)
    figures.update(model=spec, vs=vs, text=text)
    output.stdout().print(feature_table(figures))
    return figures
