"""`rankwise eval` beyond perplexity: lm-eval tasks for LMs, embedding measures for encoders."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from rankwise.cli import output
from rankwise.core.errors import ModelNotFoundError
from rankwise.core.progress import cli_reporter
from rankwise.evaluation.encoder import EncoderTexts, encoder_figures, is_encoder
from rankwise.model.accounting import count_parameters, fp32_bytes
from rankwise.model.loading import Loaded
from rankwise.report.tables import human_bytes
from rankwise.storage.manifest import Manifest
from rankwise.storage.saved import directory_bytes, is_compressed_dir
from rankwise.storage.sources import BUNDLED, load_model


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
