"""The `rankwise` command: compress, recover, truncate, eval, inspect, report, features, bench.

Every flag maps onto a Recipe field; `--recipe r.yaml` loads one and flags override it.
User mistakes print one line `error: ...` and exit 2, with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rankwise.cli import output
from rankwise.core.errors import RankwiseError
from rankwise.core.recipe import Recipe

# Recipe fields with no `compress` flag: lists of objects and recovery's finer settings (the
# `recover` command has flags for most of those). docs/recipe.md lists every field.
YAML_ONLY = ("overrides", "recover")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _split(value: str | None) -> list[str] | None:
    return [part for part in value.split(",") if part] if value else None


@app.command("compress")
def compress_cmd(
    model: Annotated[str, typer.Argument(help="'default', a HF directory or a .gguf file")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    method: Annotated[str | None, typer.Option(help="svd | fwsvd | whiten | sparse")] = None,
    ratio: Annotated[float | None, typer.Option(help="fraction of targeted params removed")] = None,
    allocation: Annotated[str | None, typer.Option(help="uniform | importance")] = None,
    targets: Annotated[str | None, typer.Option(help="comma-separated regexes")] = None,
    ignore: Annotated[str | None, typer.Option(help="comma-separated regexes")] = None,
    calib: Annotated[str | None, typer.Option(help="bbc | wiki | FILE.txt | FILE.jsonl")] = None,
    samples: Annotated[int | None, typer.Option(help="calibration windows")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per window")] = None,
    calib_dtype: Annotated[
        str | None, typer.Option(help="auto (bf16 only where native) | float32 | bfloat16")
    ] = None,
    sequential: Annotated[bool | None, typer.Option("--sequential/--no-sequential")] = None,
    staged: Annotated[
        bool | None,
        typer.Option("--staged/--no-staged", help="sequential group by group inside blocks"),
    ] = None,
    stats: Annotated[str | None, typer.Option(help="statistics file to reuse/write")] = None,
    importance_estimator: Annotated[
        str | None, typer.Option(help="fisher | output_error | relative")
    ] = None,
    importance_samples: Annotated[
        int | None, typer.Option(help="windows for the importance pass")
    ] = None,
    importance_rounds: Annotated[
        int | None, typer.Option(help="1 | 2 (2: reallocate by the Fisher of the round-1 model)")
    ] = None,
    importance_measure: Annotated[
        int | None,
        typer.Option(help="0-3 passes measuring each layer's loss at its planned rank"),
    ] = None,
    recover_steps: Annotated[
        int | None, typer.Option(help="distillation steps after compressing (0: none)")
    ] = None,
    recover_lr: Annotated[float | None, typer.Option(help="recovery peak learning rate")] = None,
    measure_samples: Annotated[
        int | None, typer.Option(help="windows each measured-importance pass scores")
    ] = None,
    eig_floor: Annotated[
        float | None, typer.Option(help="whiten: eigenvalue floor, relative to the largest")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="random seed of the run")] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted recovery")] = False,
    merge_policy: Annotated[
        str | None, typer.Option(help="decided at save: auto | never | always (merge to dense)")
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="recipe YAML; flags override it")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="measure perplexity")] = False,
    eval_windows: Annotated[int, typer.Option(help="windows per eval stream")] = 40,
    json_out: Annotated[Path | None, typer.Option("--json", help="write figures as JSON")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="allow model code from the dir")] = False,
) -> None:
    """Compress MODEL and write a loadable directory to --out."""
    from rankwise.cli.commands import run_compress

    base = Recipe.from_yaml(recipe) if recipe else Recipe()
    chosen = base.merged(
        model=model,
        method=method,
        ratio=ratio,
        allocation=allocation,
        targets=_split(targets),
        ignore=_split(ignore),
        calib=calib,
        samples=samples,
        seq_len=seq_len,
        calib_dtype=calib_dtype,
        sequential=sequential,
        staged=staged,
        stats=stats,
        importance_estimator=importance_estimator,
        importance_samples=importance_samples,
        importance_rounds=importance_rounds,
        importance_measure=importance_measure,
        measure_samples=measure_samples,
        eig_floor=eig_floor,
        seed=seed,
        recover={"steps": recover_steps, "lr": recover_lr},
        merge_policy=merge_policy,
    )
    figures = run_compress(
        chosen, out, overwrite, evaluate, eval_windows, trust_remote_code, resume
    )
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2))


@app.command("eval")
def eval_cmd(
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
) -> None:
    """Perplexity on the protocol's streams (or lm-eval --tasks; encoders: embedding cosine and
    a topic probe), parameter count and bytes."""
    from rankwise.cli.commands import run_eval
    from rankwise.cli.tasks import run_task_eval

    if tasks:
        figures = run_task_eval(model, _split(tasks) or [], limit, num_fewshot, batch_size)
    else:
        figures = run_eval(model, _split(streams) or [], windows, reference, store)
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2, default=str))


@app.command("tasks")
def tasks_cmd(
    path: Annotated[bool, typer.Option("--path", help="print only the include path")] = False,
) -> None:
    """rankwise's offline lm-eval tasks, and the folder to pass lm_eval as --include_path."""
    from rankwise.evaluation.tasks import TASKS, include_path

    if path:
        print(include_path())
        return
    output.stdout().print(f"tasks: {', '.join(TASKS)} (tag 'rankwise': all)", highlight=False)
    output.stdout().print(f"include path: {include_path()}", highlight=False, soft_wrap=True)


@app.command("recover")
def recover_cmd(
    directory: Annotated[Path, typer.Argument(help="compressed model directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    steps: Annotated[int, typer.Option(help="distillation steps")] = 200,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="windows per step")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per window")] = None,
    hidden_weight: Annotated[
        float | None, typer.Option(help="weight of last-hidden-state matching")
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="steps between checkpoints")] = None,
    teacher: Annotated[
        str | None, typer.Option(help="teacher model (default: the directory's source model)")
    ] = None,
    teacher_topk: Annotated[
        int | None, typer.Option(help="precompute the teacher's top-k logits to disk (0: live)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the loss log")] = None,
) -> None:
    """Distil the source model into DIRECTORY's factors and write the result to --out."""
    from rankwise.cli.recover import run_recover

    settings = {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "hidden_weight": hidden_weight,
        "checkpoint_every": checkpoint_every,
        "teacher_topk": teacher_topk,
    }
    log = run_recover(directory, out, settings, overwrite, resume, teacher)
    if json_out:
        json_out.write_text(json.dumps(log, indent=2))


@app.command("truncate")
def truncate_cmd(
    directory: Annotated[Path, typer.Argument(help="compressed (e.g. recovered) directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    ratio: Annotated[float, typer.Option(help="new fraction of targeted params removed")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out")] = False,
) -> None:
    """Re-factorize every factor pair to a lower rank (same shape of allocation)."""
    from rankwise.cli.recover import run_truncate

    run_truncate(directory, out, ratio, overwrite)


@app.command("inspect")
def inspect_cmd(
    directory: Annotated[Path, typer.Argument(help="compressed model directory")],
) -> None:
    """Per-layer table of a compressed model: shape, rank, kept %, estimated error."""
    from rankwise.cli.commands import run_inspect

    run_inspect(directory)


@app.command("report")
def report_cmd(
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
    from rankwise.cli.commands import run_report

    run_report(directories, out, overwrite, figures, eval_windows, _split(layers))


@app.command("features")
def features_cmd(
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
    from rankwise.cli.commands import run_features

    options = FeatureOptions(layer, module, features, neurons, top=top)
    figures = run_features(model, options, vs, text, samples, seq_len)
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2))


@app.command("bench")
def bench_cmd(
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
    from rankwise.cli.commands import run_bench
    from rankwise.evaluation.speed import BenchOptions, select_workloads
    from rankwise.storage.merge import check_policy

    options = BenchOptions(
        check_policy(merge_policy),
        repeats,
        threads,
        memory,
        compile_model,
        select_workloads(_split(only)),
    )
    figures = run_bench(model, vs, options)
    if json_out:
        json_out.write_text(json.dumps(figures, indent=2))


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rankwise draws its own bars
    try:
        app(standalone_mode=False)
    except RankwiseError as err:
        output.stderr().print(f"error: {err}", highlight=False, markup=False, soft_wrap=True)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        output.stderr().print("interrupted: nothing was written")
        raise SystemExit(130) from None
    except Exception as err:  # click usage errors carry their own exit code
        import click

        # typer >= 0.20 vendors click: its usage errors are not click.ClickException subclasses
        if isinstance(err, click.ClickException) or callable(getattr(err, "show", None)):
            err.show()
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
