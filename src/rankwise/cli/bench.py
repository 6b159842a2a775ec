"""`rankwise bench`: prefill and decode speed and peak memory of a model against a reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rankwise.cli import output
from rankwise.cli.flags import split

if TYPE_CHECKING:
    from rankwise.evaluation.speed import BenchOptions


def bench_command(
    model: Annotated[str, typer.Argument(help="compressed DIR (or 'default', a HF dir)")],
    vs: Annotated[str, typer.Option(help="reference: 'default' or a directory")] = "default",
    merge_policy: Annotated[str, typer.Option(help="auto | never | always")] = "auto",
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per model and workload")] = 5,
    threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 2,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="peak memory")] = True,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile both")] = False,
    only: Annotated[
        str | None, typer.Option(help="comma-separated workloads, e.g. 'prefill 1x512'")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write figures as JSON")] = None,
) -> None:
    """Prefill and decode tokens/s and peak memory of MODEL against --vs, with the bound."""
    from rankwise.evaluation.speed import BenchOptions, select_workloads
    from rankwise.storage.merge import check_policy

    options = BenchOptions(
        check_policy(merge_policy),
        repeats,
        threads,
        memory,
        compile_model,
        select_workloads(split(only)),
    )
    figures = run_bench(model, vs, options)
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2))


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
