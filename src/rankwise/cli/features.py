"""`rankwise features`: interpretable features of an MLP's activations (semi-NMF)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rankwise.cli import output
from rankwise.core.errors import RankwiseError
from rankwise.core.progress import cli_reporter
from rankwise.data import corpora
from rankwise.storage.sources import load_model

if TYPE_CHECKING:
    from rankwise.analysis.features import FeatureOptions


def features_command(
    model: Annotated[str, typer.Argument(help="'default', a HF dir, .gguf or compressed DIR")],
    layer: Annotated[int | None, typer.Option(help="block index (default: the middle)")] = None,
    module: Annotated[str | None, typer.Option(help="the linear whose input to read")] = None,
    features: Annotated[int, typer.Option(min=1, help="semi-NMF features")] = 32,
    neurons: Annotated[
        int | None, typer.Option(min=0, help="neurons kept per feature (default: 10%; 0: all)")
    ] = None,
    vs: Annotated[str | None, typer.Option(help="a second model (e.g. compressed)")] = None,
    text: Annotated[str, typer.Option(help="bbc | wiki | FILE.txt | FILE.jsonl")] = "bbc",
    samples: Annotated[int, typer.Option(min=1, help="windows of text")] = 8,
    seq_len: Annotated[int, typer.Option(min=2, help="tokens per window")] = 512,
    top: Annotated[int, typer.Option(min=1, help="contexts and tokens per feature")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="write figures as JSON")] = None,
) -> None:
    """Interpretable features of an MLP's activations (semi-NMF), and what --vs keeps of them."""
    from rankwise.analysis.features import FeatureOptions

    options = FeatureOptions(layer, module, features, neurons, top=top)
    figures = run_features(model, options, vs, text, samples, seq_len)
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2))


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
