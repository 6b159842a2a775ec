"""Speed of compressed models against the dense default model: prefill and decode tokens/s.

Each configuration runs `rankwise bench DIR --vs default --json ...` in its own process (its own
peak memory, no state carried between them), then the tables are written to
bench/results/speed.md and the raw figures to bench/results/speed.json. Run it under the shared
CPU lock: timings taken while other jobs run mean nothing.

    flock /tmp/rankwise-cpu.lock python bench/speed.py /tmp/models/w40:auto /tmp/models/w40:never
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from rankwise.evaluation.speed import speed_table  # noqa: E402


def run_one(model: str, policy: str, vs: str, repeats: int, threads: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.json"
        command = [
            sys.executable, "-m", "rankwise", "bench", model, "--vs", vs,
            "--merge-policy", policy, "--repeats", str(repeats), "--threads", str(threads),
            "--json", str(figures), *extra,
        ]  # fmt: skip
        print(" ".join(command[1:]), flush=True)
        done = subprocess.run(command, text=True)
        if done.returncode != 0:
            raise SystemExit(f"failed: {' '.join(command)}")
        return json.loads(figures.read_text())


def markdown(figures: dict) -> str:
    header, *rows = speed_table(figures)
    lines = [
        f"### {figures['model']} ({figures['merge_policy']}"
        f"{', compiled' if figures['compile'] else ''}) vs {figures['reference']}",
        "",
        f"{len(figures['merged_layers'])} layers merged by the policy, "
        f"{figures['factorized_layers']} kept factorized (policy decided in "
        f"{figures['policy_seconds']:.1f} s); {figures['threads']} threads, "
        f"median of {figures['repeats']} alternating runs.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="DIR:POLICY (policy auto | never | always)")
    parser.add_argument("--vs", default="default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--only", help="comma-separated workloads (rankwise bench --only)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.md")
    parser.add_argument("--append", action="store_true", help="add to an existing --out")
    args = parser.parse_args()
    extra = ["--compile"] if args.compile else []
    extra += ["--only", args.only] if args.only else []
    extra += ["--no-memory"] if args.no_memory else []
    results = []
    for config in args.configs:
        model, _, policy = config.partition(":")
        results.append(run_one(model, policy or "auto", args.vs, args.repeats, args.threads, extra))
    intro = (
        "# Speed against dense\n\n"
        f"`python bench/speed.py {' '.join(sys.argv[1:])}` on {platform.processor() or 'CPU'} "
        f"({platform.machine()}), torch threads {args.threads}. Tokens/s: prompt tokens read "
        "(prefill, one forward with all logits) or new tokens generated (decode: greedy, 32-token "
        "prompt, 64 new tokens, never stopping early). ratio = model / reference; bound = "
        "reference / model multiply-adds (linears, factorized ones at r*(out+in), LM head and "
        "attention), the most the factors could give. Peak memory: resident MiB a fresh process "
        "adds loading the model and running every workload once.\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_suffix(".json")
    sections = "\n".join(markdown(f) for f in results)
    if args.append and args.out.is_file():
        results = (json.loads(raw.read_text()) if raw.is_file() else []) + results
        sections = (
            args.out.read_text()
            + f"\n`python bench/speed.py {' '.join(sys.argv[1:])}`\n\n"
            + sections
        )
        intro = ""
    args.out.write_text(intro + sections)
    raw.write_text(json.dumps(results, indent=2))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
