"""`rankwise report`: an HTML page comparing compressed directories, readable offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rankwise.cli import output
from rankwise.cli.evaluate import run_eval
from rankwise.cli.flags import split
from rankwise.data import corpora
from rankwise.storage.saved import check_output


def report_command(
    directories: Annotated[list[Path], typer.Argument(help="compressed model directories")],
    out: Annotated[Path, typer.Option("--out", "-o", help="report directory (index.html)")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    figures: Annotated[
        list[Path] | None, typer.Option("--figures", help="JSON from eval/compress --json")
    ] = None,
    eval_windows: Annotated[
        int, typer.Option(help="measure perplexity where none is stored (0: do not)")
    ] = 0,
    layers: Annotated[str | None, typer.Option(help="comma-separated layers for spectra")] = None,
) -> None:
    """An HTML page with plots comparing compressed directories, readable offline."""
    run_report(directories, out, overwrite, figures, eval_windows, split(layers))


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
