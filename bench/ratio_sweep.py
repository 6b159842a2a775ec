"""Ratio sweep: method x ratio -> params, bytes, perplexity per stream, seconds, peak memory.

Each configuration runs as its own `rankwise compress ... --eval --json` process (so its peak
memory is its own); statistics are gathered once per method and reused across ratios.

    python bench/ratio_sweep.py                       # svd, fwsvd, whiten x 0.2, 0.4, 0.6
    python bench/ratio_sweep.py --methods whiten --ratios 0.4 --sequential
    python bench/ratio_sweep.py --methods whiten --ratios 0.4,0.6 --sequential \
        --allocations uniform,importance --out bench/results/allocation.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run_one(
    model: str,
    method: str,
    ratio: float,
    stats: Path,
    sequential: bool,
    windows: int,
    extra: list[str],
    allocation: str = "uniform",
    estimator: str = "fisher",
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out, figures = Path(tmp) / "model", Path(tmp) / "figures.json"
        command = [
            sys.executable,
            "-m",
            "rankwise",
            "compress",
            model,
            "--method",
            method,
            "--ratio",
            str(ratio),
            "--out",
            str(out),
            "--eval",
            "--eval-windows",
            str(windows),
            "--json",
            str(figures),
            "--allocation",
            allocation,
            "--importance-estimator",
            estimator,
            *extra,
        ]
        # --stats: the dense model's statistics, gathered once per method, one pass.
        command += ["--sequential"] if sequential else ["--stats", str(stats)]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        result = json.loads(figures.read_text())
        result["wall_seconds"] = time.perf_counter() - start
        return result


def fmt(value: float) -> str:
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def allocation_label(recipe: dict) -> str:
    if recipe.get("allocation", "uniform") == "uniform":
        return "uniform"
    return f"importance ({recipe.get('importance_estimator', 'fisher')})"


def table(rows: list[dict], streams: list[str]) -> str:
    head = (
        "| model | method | allocation | ratio | targeted removed | model removed | params "
        "| bytes | "
        + " | ".join(f"ppl {s}" for s in streams)
        + " | calibrate s | importance s | allocate s | factorize s | compress total s "
        "| peak MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        c = row["compressed"]
        phases = c["phases"]
        calib = phases.get("calibrate", phases.get("calibrate+factorize", 0.0))
        importance = sum(v for k, v in phases.items() if k.startswith("importance"))
        importance += phases.get("spectra", 0.0)
        lines.append(
            f"| {row['recipe']['model']} | {row['recipe']['method']}"
            f"{' seq' if row['recipe']['sequential'] and not row['recipe']['stats'] else ''} | "
            f"{allocation_label(row['recipe'])} | "
            f"{row['recipe']['ratio']:g} | "
            f"{c['targeted_ratio']:.1%} | {c['model_ratio']:.1%} | {c['params']:,} | "
            f"{c['bytes'] / 1e6:.1f} MB | "
            + " | ".join(fmt(c["perplexity"][s]) for s in streams)
            + f" | {calib:.1f} | {importance:.1f} | {phases.get('allocate', 0.0):.2f}"
            f" | {phases.get('factorize', 0.0):.1f} | {c['seconds']:.1f} | "
            f"{c['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines)


def configs(args: argparse.Namespace) -> list[tuple[float, str, str]]:
    """(ratio, allocation, estimator) in run order: uniform once per ratio, then estimators."""
    out = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        for allocation in args.allocations.split(","):
            estimators = args.estimators.split(",") if allocation == "importance" else ["fisher"]
            out += [(ratio, allocation, estimator) for estimator in estimators]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", default="svd,fwsvd,whiten")
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--sequential", action="store_true")
    parser.add_argument("--allocations", default="uniform", help="uniform,importance")
    parser.add_argument(
        "--estimators", default="fisher", help="importance estimators: fisher,output_error,relative"
    )
    parser.add_argument("--out", default=str(RESULTS / "ratio_sweep.md"))
    parser.add_argument("--extra", default="", help="extra compress flags, space separated")
    args = parser.parse_args()
    streams = ["bbc", "wiki"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            stats = Path(tmp) / f"{method}.safetensors"
            for ratio, allocation, estimator in configs(args):
                row = run_one(
                    args.model,
                    method,
                    ratio,
                    stats,
                    args.sequential,
                    args.windows,
                    args.extra.split(),
                    allocation,
                    estimator,
                )
                rows.append(row)
                print(table(rows[-1:], streams).splitlines()[-1], flush=True)
    dense = rows[0]["dense"]
    text = (
        f"# Ratio sweep ({args.model})\n\n"
        f"Protocol: DESIGN.md §7 (calibration: 128 BBC windows of 512 tokens unless stated; "
        f"evaluation: first {args.windows} windows of 512 tokens per stream). "
        f"`ratio` = fraction of the targeted linears' parameters removed.\n\n"
        f"Dense: {dense['params']:,} params, "
        + ", ".join(f"ppl {s} {fmt(dense['perplexity'][s])}" for s in streams)
        + "\n\n"
        + table(rows, streams)
        + "\n\n"
        "calibrate s: statistics gathering (0 where reused from the method's first ratio).\n"
        f"Command: `python bench/ratio_sweep.py {' '.join(sys.argv[1:])}`\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
