"""Resume, several processes and the saved dtype, measured on the default model with the CLI.

Runs `rankwise compress default --ratio 0.4` (demo-sized calibration) in subprocesses, one at a
time, and writes bench/results/processes.md:
1. uninterrupted, with evaluation (the reference);
2. killed (SIGKILL) after `--kill-after` seconds, then run again with `--resume`: its saved
   tensors compared bit for bit with the reference's;
3. `torchrun --nproc-per-node 2` (gloo, CPU): time against run 1, tensors compared (equal up
   to floating-point summation order: the grams are summed over two shards);
4. `--dtype bfloat16`: bytes and perplexity against the float32 reference.

    python bench/processes.py [--kill-after 60] [--skip torchrun]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

RESULTS = Path(__file__).parent / "results"
DEMO = ["--samples", "16", "--seq-len", "256", "--importance-samples", "4"]
EVAL = ["--eval", "--eval-windows", "8"]


def rankwise(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankwise", "compress", "default", "--ratio", "0.4", *DEMO, *args]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def compare(a: Path, b: Path) -> tuple[bool, float]:
    """(bit-identical, largest absolute difference) of two saved directories' tensors."""
    first, second = weights(a), weights(b)
    if first.keys() != second.keys():
        return False, float("inf")
    worst = 0.0
    for key, value in first.items():
        if value.shape != second[key].shape:
            return False, float("inf")
        if value.is_floating_point():
            worst = max(worst, float((value.float() - second[key].float()).abs().max()))
        elif not torch.equal(value, second[key]):
            return False, float("inf")
    return all(torch.equal(first[k], second[k]) for k in first), worst


def killed_then_resumed(out: Path, kill_after: float) -> tuple[float, float]:
    """(seconds before the kill, seconds of the resumed run)."""
    process = subprocess.Popen(rankwise("--out", str(out)), start_new_session=True)
    time.sleep(kill_after)
    if process.poll() is not None:
        raise SystemExit("the run finished before the kill: lower --kill-after")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists(), "a killed run must leave no output directory"
    return kill_after, timed(rankwise("--out", str(out), "--resume"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after", type=float, default=60.0)
    parser.add_argument("--skip", action="append", default=[])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rankwise-processes-"))
    rows = [f"CPU: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores", ""]
    reference = root / "reference"
    seconds = timed(rankwise("--out", str(reference), *EVAL, "--json", str(root / "ref.json")))
    figures = json.loads((root / "ref.json").read_text())["compressed"]
    rows += [
        "| run | seconds | equal to the reference | largest difference | note |",
        "|---|---|---|---|---|",
        f"| uninterrupted | {seconds:.0f} | - | - | perplexity {figures['perplexity']} |",
    ]
    if "resume" not in args.skip:
        before, after = killed_then_resumed(root / "resumed", args.kill_after)
        same, worst = compare(reference, root / "resumed")
        rows.append(
            f"| killed at {before:.0f} s, then --resume | {after:.0f} (resumed part) | "
            f"{'bit for bit' if same else 'no'} | {worst:.2e} | |"
        )
    if "torchrun" not in args.skip:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "2", "-m", "rankwise", "compress", "default",
                  "--ratio", "0.4", *DEMO, "--out", str(root / "two")]  # fmt: skip
        env_seconds = timed(launch)
        same, worst = compare(reference, root / "two")
        rows.append(
            f"| torchrun, 2 processes (gloo) | {env_seconds:.0f} | "
            f"{'bit for bit' if same else 'up to summation order'} | {worst:.2e} | "
            "2 cores: no speedup expected |"
        )
    if "dtype" not in args.skip:
        out = root / "bf16"
        seconds = timed(rankwise("--out", str(out), "--dtype", "bfloat16", *EVAL,
                                 "--json", str(root / "bf16.json")))  # fmt: skip
        bf16 = json.loads((root / "bf16.json").read_text())["compressed"]
        rows.append(
            f"| --dtype bfloat16 | {seconds:.0f} | - | - | {bf16['bytes'] / 1e6:.0f} MB "
            f"against {figures['bytes'] / 1e6:.0f} MB; perplexity {bf16['perplexity']} |"
        )
    text = "\n".join(["# Resume, processes and saved dtype (default model, ratio 0.4)", "",
                      "`python bench/processes.py`; demo-sized calibration "
                      "(16 windows of 256 tokens, 4 for importance), 8 evaluation windows.", "",
                      *rows, ""])  # fmt: skip
    (RESULTS / "processes.md").write_text(text)
    print(text)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
