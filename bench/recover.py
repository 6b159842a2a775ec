"""Recovery curve: distillation loss and held-out perplexity against steps.

Starts from a compressed directory (`--from D`, e.g. made by `rankwise compress default
--method whiten --ratio 0.4 --out D`), distils the source model into its factors, measures
perplexity on the protocol streams every `--eval-every` steps (on `--curve-windows` windows, not
counted in the training time) and at the end on the protocol's 40 windows, saves the recovered
model (`--save`), and writes bench/results/recover.md (+ .json, + .png when matplotlib is there).

    python bench/recover.py --from D --steps 200 --save D-rec
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rankwise.cli.recover import saved_recipe
from rankwise.core.recipe import RecoverConfig
from rankwise.data import corpora
from rankwise.evaluation import perplexity as evaluate
from rankwise.recovery.distill import recover
from rankwise.storage.manifest import Manifest
from rankwise.storage.saved import load_compressed, save_compressed
from rankwise.storage.sources import load_model

RESULTS = Path(__file__).parent / "results"


def perplexities(model: torch.nn.Module, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    return {s: evaluate.perplexity(model, w).perplexity for s, w in windows.items()}


def plot(curve: list[dict], losses: list[float], path: Path) -> bool:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, ppl_axes = figure.subplots(1, 2)
    loss_axes.plot(range(1, len(losses) + 1), losses)
    loss_axes.set(xlabel="step", ylabel="KL(teacher || student) per token", title="training loss")
    for stream in curve[0]["perplexity"]:
        steps = [point["step"] for point in curve]
        ppl_axes.plot(steps, [p["perplexity"][stream] for p in curve], marker="o", label=stream)
    ppl_axes.set(xlabel="step", ylabel="perplexity", yscale="log", title="held-out perplexity")
    ppl_axes.legend()
    figure.savefig(path, dpi=110)
    return True


def table(summary: dict, curve: list[dict]) -> str:
    streams = list(summary["before"])
    lines = [
        f"# Recovery: {summary['source']}",
        "",
        f"`{summary['command']}`",
        "",
        f"{summary['steps']} steps x {summary['batch_size']} windows x {summary['seq_len']} "
        f"tokens, lr {summary['lr']}, training {summary['train_seconds']:.0f} s "
        f"({summary['tokens_per_second']:.0f} tok/s), {summary['threads']} threads.",
        "",
        "| protocol (40 windows) | " + " | ".join(streams) + " |",
        "|---|" + "---|" * len(streams),
        "| before recovery | " + " | ".join(f"{summary['before'][s]:.2f}" for s in streams) + " |",
        "| after recovery | " + " | ".join(f"{summary['after'][s]:.2f}" for s in streams) + " |",
        "| change | "
        + " | ".join(f"{summary['after'][s] / summary['before'][s] - 1:+.1%}" for s in streams)
        + " |",
        "",
        f"Curve ({summary['curve_windows']} windows per stream):",
        "",
        "| step | loss | " + " | ".join(streams) + " |",
        "|---|---|" + "---|" * len(streams),
    ]
    for point in curve:
        loss = "" if point["loss"] is None else f"{point['loss']:.4f}"
        cells = " | ".join(f"{point['perplexity'][s]:.2f}" for s in streams)
        lines.append(f"| {point['step']} | {loss} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--from", dest="source", required=True, help="compressed directory")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--hidden-weight", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--curve-windows", type=int, default=10)
    parser.add_argument("--windows", type=int, default=40, help="protocol windows per stream")
    parser.add_argument(
        "--before", default=None, help="known protocol perplexities, e.g. bbc=98.76,wiki=278.60"
    )
    parser.add_argument("--save", type=Path, default=None, help="write the recovered model here")
    parser.add_argument("--out", type=Path, default=RESULTS / "recover.md")
    args = parser.parse_args()
    torch.set_num_threads(2)

    student = load_compressed(args.source)
    recipe = saved_recipe(args.source)
    changes = dict(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                   seq_len=args.seq_len, hidden_weight=args.hidden_weight)  # fmt: skip
    recipe = recipe.merged(recover=changes)
    settings: RecoverConfig = recipe.recover
    teacher = load_model(recipe.model)
    tokenizer = student.tokenizer
    full = corpora.eval_windows(tokenizer, corpora.EVAL_STREAMS, count=args.windows)
    short = {s: w[: args.curve_windows] for s, w in full.items()}
    if args.before:
        before = {k: float(v) for k, v in (kv.split("=") for kv in args.before.split(","))}
    else:
        before = perplexities(student.model, full)
    curve = [{"step": 0, "loss": None, "perplexity": perplexities(student.model, short)}]
    print("before", before, flush=True)

    def on_step(step: int, loss: float) -> None:
        if step % args.eval_every == 0 or step == settings.steps:
            curve.append(
                {"step": step, "loss": loss, "perplexity": perplexities(student.model, short)}
            )
            print(curve[-1], flush=True)

    train = corpora.calibration_windows(tokenizer, recipe.calib, settings.windows, settings.seq_len)
    log = recover(student.model, teacher.model, train, settings, on_step=on_step)
    after = perplexities(student.model, full)
    print("after", after, flush=True)
    if args.save:
        manifest = Manifest.read(args.source).model_copy(
            update={"recovery": {"steps": settings.steps, "seconds": log.seconds}}
        )
        save_compressed(student.model, args.save, manifest, tokenizer, recipe.to_yaml(), True)

    summary = {
        "source": str(args.source),
        "command": "python bench/recover.py "
        + " ".join(f"{k} {v}" for k, v in [("--from", args.source), ("--steps", args.steps)]),
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "seq_len": settings.seq_len,
        "lr": settings.lr,
        "train_seconds": log.seconds,
        "tokens_per_second": log.tokens_per_second,
        "threads": torch.get_num_threads(),
        "curve_windows": args.curve_windows,
        "before": before,
        "after": after,
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = table(summary, curve)
    if plot(curve, log.losses, args.out.with_suffix(".png")):
        text += f"\n![loss and perplexity]({args.out.with_suffix('.png').name})\n"
    args.out.write_text(text)
    payload = {"summary": summary, "curve": curve, "losses": log.losses}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(text)


if __name__ == "__main__":
    main()
