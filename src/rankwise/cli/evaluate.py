"""`rankwise eval` and `rankwise tasks`: perplexity on the protocol's streams, lm-eval tasks for
LMs, embedding measures for encoders; and the perplexity helpers `compress --eval` and `report`
share.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rankwise.cli import output
from rankwise.cli.flags import split
from rankwise.core.atomic import atomic_write_text
from rankwise.core.errors import ModelNotFoundError, RankwiseError
from rankwise.core.hardware import resolve_device
from rankwise.core.progress import Reporter, cli_reporter
from rankwise.data import corpora
from rankwise.evaluation import perplexity as evaluate
from rankwise.evaluation.encoder import EncoderTexts, encoder_figures, is_encoder
from rankwise.model.accounting import count_parameters, fp32_bytes
from rankwise.model.loading import Loaded
from rankwise.report.tables import human_bytes, summary_table
from rankwise.storage.manifest import Manifest
from rankwise.storage.saved import EVAL_FILE, directory_bytes, is_compressed_dir
from rankwise.storage.sources import BUNDLED, cache_dir, load_model


def eval_command(
    model: Annotated[str, typer.Argument(help="compressed DIR, 'default', HF dir or .gguf")],
    windows: Annotated[int, typer.Option(help="windows per stream")] = 40,
    streams: Annotated[str, typer.Option(help="comma-separated: bbc, wiki, or .txt files")] = (
        "bbc,wiki"
    ),
    json_out: Annotated[Path | None, typer.Option("--json", help="write figures as JSON")] = None,
    store: Annotated[
        bool, typer.Option("--store/--no-store", help="keep figures in DIR/eval.json")
    ] = True,
    tasks: Annotated[
        str | None, typer.Option(help="lm-eval tasks: rt_sentiment, bbc_topic, bbc_perplexity...")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="documents per lm-eval task")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval few-shot examples")] = None,
    batch_size: Annotated[int, typer.Option(help="lm-eval batch size")] = 8,
    reference: Annotated[
        str | None, typer.Option(help="encoders: the original model (default: the source)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present) | cpu | cuda:N")] = "cpu",
) -> None:
    """Perplexity on the protocol's streams (or lm-eval --tasks; encoders: embedding cosine and
    a topic probe), parameter count and bytes."""
    if tasks:
        figures = run_task_eval(model, split(tasks) or [], limit, num_fewshot, batch_size)
    else:
        figures = run_eval(model, split(streams) or [], windows, reference, store, device)
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2, default=str))


def tasks_command(
    path: Annotated[bool, typer.Option("--path", help="print only the include path")] = False,
) -> None:
    """rankwise's offline lm-eval tasks, and the folder to pass lm_eval as --include_path."""
    from rankwise.evaluation.tasks import TASKS, include_path

    if path:
        print(include_path())
        return
    output.stdout().print(f"tasks: {', '.join(TASKS)} (tag 'rankwise': all)", highlight=False)
    output.stdout().print(f"include path: {include_path()}", highlight=False, soft_wrap=True)


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
    device: str = "cpu",
) -> dict[str, object]:
    reporter = cli_reporter()
    with reporter.task(f"loading {spec}") as advance:
        loaded = load_model(spec)
        advance(1)
    loaded.model.to(resolve_device(device))  # perplexity runs where the model is
    if is_encoder(loaded.model):  # no LM loss: embedding fidelity and a topic probe instead
        return run_encoder_eval(loaded, spec, reference)
    ppl = measure_perplexity(loaded, eval_token_windows(loaded, streams, windows), reporter)
    row = {**size_row(loaded, spec), "perplexity": ppl, "windows": windows}
    if store and is_compressed_dir(spec):
        store_eval(Path(spec), row, reporter)
    output.stdout().print(summary_table([row], streams))
    return row


def size_row(loaded: Loaded, spec: str) -> dict[str, object]:
    """Name, parameters, bytes on disk (fp32 for a source that is no directory), and for a
    compressed directory its manifest's ratios and source model."""
    params = count_parameters(loaded.model)
    path = Path(spec)
    on_disk = directory_bytes(path) if path.is_dir() else fp32_bytes(params)
    row: dict[str, object] = {"name": spec, "params": params, "bytes": on_disk}
    if path.is_dir() and is_compressed_dir(path):
        manifest = Manifest.read(path)
        row["targeted_ratio"] = manifest.targeted_ratio
        row["model_ratio"] = manifest.model_ratio
        row["source_model"] = manifest.source_model
    return row


def _load(spec: str) -> Loaded:
    reporter = cli_reporter()
    with reporter.task(f"loading {spec}") as advance:
        loaded = load_model(spec)
        advance(1)
    return loaded


def run_task_eval(
    spec: str,
    tasks: list[str],
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
) -> dict[str, object]:
    """lm-eval's simple_evaluate on the model; prints its table and the headline figures."""
    from rankwise.evaluation.harness import run_tasks

    loaded = _load(spec)
    results = run_tasks(loaded.model, loaded.tokenizer, tasks, limit, num_fewshot, batch_size)
    print(results.table)
    metrics = results.metrics()
    for task, values in metrics.items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in values.items())
        output.stdout().print(f"{task}: {shown}", highlight=False)
    row = size_row(loaded, spec)
    row.update(
        {"tasks": metrics, "limit": limit, "num_fewshot": num_fewshot, "lm_eval": results.results}
    )
    return row


def reference_spec(spec: str, reference: str | None, row: dict[str, object]) -> str | None:
    """The original model to compare with: --reference, else the one the directory came from.
    None when `spec` is itself an original (dense) model."""
    if reference:
        return reference
    source = row.get("source_model")
    if source is None:
        return None
    if source not in BUNDLED and not Path(str(source)).exists():
        raise ModelNotFoundError(
            f"{spec} was compressed from {source}, which is not found: pass --reference"
        )
    return str(source)


def run_encoder_eval(
    loaded: Loaded,
    spec: str,
    reference: str | None = None,
    sentences: int = 512,
    train_per_topic: int = 60,
) -> dict[str, object]:
    """Cosine to the original's sentence embeddings and BBC topic probe accuracy (both models)."""
    row = size_row(loaded, spec)
    original = reference_spec(spec, reference, row)
    texts = EncoderTexts.bbc(sentences, train_per_topic)
    reference_model = _load(original).model if original else None
    if reference_model is not None and not is_encoder(reference_model):
        raise ModelNotFoundError(f"reference {original} is not an encoder: pass --reference")
    figures = encoder_figures(loaded.model, loaded.tokenizer, texts, reference_model)
    row.update(figures)
    row["reference"] = original or spec
    output.stdout().print(encoder_table([row]))
    return row


def encoder_table(rows: list[dict[str, object]]) -> Table:
    table = Table(title="rankwise encoder")
    columns = ("model", "params", "model removed", "bytes", "cosine", "probe acc", "original")
    for column in columns:
        if column == "model":
            table.add_column(column, overflow="fold")  # a path: shown whole, not cut to "…"
        else:
            table.add_column(column, justify="right")
    for row in rows:
        ratio = row.get("model_ratio")
        table.add_row(
            str(row["name"]),
            f"{row['params']:,}",
            f"{ratio:.1%}" if ratio is not None else "-",
            human_bytes(row["bytes"]),
            f"{row['cosine']:.4f}",
            f"{row['probe_accuracy']:.4f}",
            f"{row['reference_probe_accuracy']:.4f}",
        )
    return table
