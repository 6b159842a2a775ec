"""Evaluation at the speed of the model: perplexity over N windows against N plain forwards.

Same process, same windows (the first N of 512 tokens of BBC held-out), alternating: a plain
forward is `model(input_ids=window)` with every position's logits (what any scorer must compute);
perplexity is `rankwise.evaluation.perplexity.perplexity` (float64 NLL, nothing dropped). The
ratio is perplexity seconds / forward seconds; the goal is at most 1.3.

    python bench/eval_speed.py                      # the dense default model
    python bench/eval_speed.py --model DIR --windows 8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rankwise.core.hardware import machine_line
from rankwise.data import corpora
from rankwise.evaluation.perplexity import perplexity
from rankwise.storage.sources import load_model

RESULTS = Path(__file__).parent / "results"


def forwards(model: torch.nn.Module, windows: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for row in range(len(windows)):
            model(input_ids=windows[row : row + 1], use_cache=False)
    return time.perf_counter() - start


def scored(model: torch.nn.Module, windows: torch.Tensor) -> float:
    start = time.perf_counter()
    perplexity(model, windows)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", action="append", help="repeatable; default: the dense default")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for spec in args.model or ["default"]:
        loaded = load_model(spec)
        model = loaded.model.eval()
        windows = corpora.eval_windows(loaded.tokenizer, ("bbc",), count=args.windows)["bbc"]
        forwards(model, windows[:1])  # warm-up
        plain, ppl = [], []
        for _ in range(args.rounds):
            plain.append(forwards(model, windows))
            ppl.append(scored(model, windows))
        rows.append((spec, min(plain), min(ppl)))
    lines = [
        "# Evaluation cost against plain forwards (bench/eval_speed.py)",
        "",
        f"{machine_line()}; {args.windows} windows of 512 tokens, fastest of {args.rounds} "
        "alternating rounds.",
        "",
        "| model | N forwards (s) | perplexity (s) | ratio |",
        "|---|---|---|---|",
        *(f"| {s} | {f:.1f} | {p:.1f} | **{p / f:.2f}x** |" for s, f, p in rows),
        "",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "eval_speed.md").write_text(table)


if __name__ == "__main__":
    main()
