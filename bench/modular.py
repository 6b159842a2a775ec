"""Modular decomposition (narrowed MLPs) against whiten at the same parameter count.

For each ratio: `modular` (hybrid: importance over MLP widths and attention ranks), `portable`
(one MLP width, attention dense, a plain transformers checkpoint) and `whiten` at the targeted
ratio the hybrid achieved. Demo-sized calibration (16 windows of 256 tokens, 4 importance
windows), perplexity on 8 windows of 512 tokens per stream (BBC held-out, Wikipedia), params,
safetensors bytes, compression seconds; then `rankwise bench`'s prefill 1x512 and batch-1 decode
against dense (evaluation/speed.py), each model in this process one after another. Each run's
figures go to WORKDIR/NAME.json (an existing one is reused, so an interrupted run resumes);
`--render` writes bench/results/modular.md from them.

    python bench/modular.py --ratios 0.4 --workdir /tmp/modular
    python bench/modular.py --ratios 0.2,0.4,0.6 --workdir /tmp/modular --render
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rankwise
from rankwise.data import corpora
from rankwise.evaluation import perplexity as evaluate
from rankwise.evaluation.speed import BenchOptions, bench, select_workloads
from rankwise.model.accounting import count_parameters
from rankwise.storage.manifest import Manifest
from rankwise.storage.saved import directory_bytes

RESULTS = Path(__file__).parent / "results"
KINDS = ("modular", "portable", "whiten")
DEMO = dict(samples=16, seq_len=256, importance_samples=4, calib_dtype="float32")
WORKLOADS = ("prefill 1x512", "decode 1x64")


def eval_windows() -> dict[str, torch.Tensor]:
    tokenizer = rankwise.load_model("default").tokenizer
    return corpora.eval_windows(tokenizer, ("bbc", "wiki"), seq_len=512, count=8)


def perplexities(model: torch.nn.Module, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    return {s: evaluate.perplexity(model, w).perplexity for s, w in windows.items()}


def speed(directory: str) -> dict[str, float]:
    workloads = select_workloads(list(WORKLOADS))
    options = BenchOptions(repeats=5, threads=2, memory=False, workloads=workloads)
    figures = bench(directory, "default", options)
    rows = {row["workload"]: row["ratio"] for row in figures["rows"]}
    rows.update({f"{row['workload']} bound": row["bound"] for row in figures["rows"]})
    return rows


def recipe_for(kind: str, ratio: float) -> rankwise.Recipe:
    if kind == "portable":
        return rankwise.Recipe(method="modular", portable=True, ratio=ratio, **DEMO)
    return rankwise.Recipe(method=kind, ratio=ratio, **DEMO)


def run_one(kind: str, ratio: float, work: Path, windows: dict, whiten_ratio: float | None) -> dict:
    name = f"{kind}{round(ratio * 100)}"
    done = work / f"{name}.json"
    if done.exists():
        return json.loads(done.read_text())
    loaded = rankwise.load_model("default")
    recipe = recipe_for(kind, whiten_ratio if kind == "whiten" and whiten_ratio else ratio)
    start = time.perf_counter()
    result = rankwise.compress(loaded.model, recipe, tokenizer=loaded.tokenizer)
    seconds = time.perf_counter() - start
    out = rankwise.save(result, str(work / name), loaded.tokenizer, overwrite=True)
    del loaded, result
    model = rankwise.load(out)
    row = {
        "kind": kind,
        "ratio": ratio,
        "requested": recipe.ratio,
        "targeted_ratio": Manifest.read(out).targeted_ratio,
        "params": count_parameters(model),
        "bytes": directory_bytes(out),
        "perplexity": perplexities(model, windows),
        "compress_s": seconds,
    }
    del model
    row["speed"] = speed(out)
    done.write_text(json.dumps(row, indent=2))
    return row


def dense_row(work: Path, windows: dict) -> dict:
    done = work / "dense.json"
    if done.exists():
        return json.loads(done.read_text())
    model = rankwise.load_model("default").model
    row = {"kind": "dense", "ratio": 0.0, "targeted_ratio": 0.0, "params": count_parameters(model)}
    row["perplexity"] = perplexities(model, windows)
    done.write_text(json.dumps(row, indent=2))
    return row


def render(rows: list[dict]) -> str:
    cpu = torch.backends.cpu.get_cpu_capability()
    head = (
        "| ratio | kind | targeted removed | params | safetensors bytes | ppl BBC | ppl wiki "
        "| prefill 1x512 vs dense | decode 1x64 vs dense | compress s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        ppl, fast = row["perplexity"], row.get("speed", {})
        bound = {k: fast.get(f"{k} bound") for k in WORKLOADS}
        prefill, decode = (
            f"{fast[k]:.2f}x" + (f" (bound {bound[k]:.2f}x)" if bound[k] else "") if fast else ""
            for k in WORKLOADS
        )
        lines.append(
            f"| {row['ratio']:g} | {row['kind']} | {row['targeted_ratio']:.2%} | "
            f"{row['params']:,} | {row.get('bytes', 0):,} | {ppl['bbc']:.2f} | {ppl['wiki']:.2f} "
            f"| {prefill} | {decode} | {row.get('compress_s', 0):.0f} |"
        )
    return (
        "# Modular decomposition (narrowed MLPs) vs whiten, SmolLM2-135M\n\n"
        f"CPU capability {cpu}, torch {torch.__version__}, float32, 2 threads. Calibration: "
        "16 BBC windows of 256 tokens (4 for importance); perplexity: 8 windows of 512 tokens "
        "per stream. whiten is run at the targeted ratio the modular (hybrid) run achieved. "
        "Speed: `rankwise bench` workloads (prefill: all positions' logits), median of 5, "
        "ratio of tokens/s against dense.\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", default="0.4")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--workdir", default="/tmp/rankwise-modular")
    parser.add_argument("--render", action="store_true")
    parser.add_argument("--respeed", action="store_true", help="time the saved models again")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    windows = eval_windows()
    rows = [dense_row(work, windows)]
    for ratio in (float(r) for r in args.ratios.split(",")):
        achieved = None
        for kind in args.kinds.split(","):
            row = run_one(kind, ratio, work, windows, achieved)
            if args.respeed:
                row["speed"] = speed(str(work / f"{kind}{round(ratio * 100)}"))
                (work / f"{kind}{round(ratio * 100)}.json").write_text(json.dumps(row, indent=2))
            achieved = row["targeted_ratio"] if kind == "modular" else achieved
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.render:
        (RESULTS / "modular.md").write_text(render(rows))


if __name__ == "__main__":
    main()
