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
# merge decisions are timed at save, so they may differ between runs: compared runs keep every
# factor (the tensors then say everything)
DEMO = ["--samples", "16", "--seq-len", "256", "--importance-samples", "4"]
DEMO += ["--merge-policy", "never"]


def rankwise(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankwise", "compress", "default", "--ratio", "0.4", *DEMO, *args]


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def perplexity(directory: Path) -> str:
    """`rankwise eval DIR --windows 8`: BBC / Wikipedia perplexity."""
    figures = directory.with_suffix(".eval.json")
    command = [sys.executable, "-m", "rankwise", "eval", str(directory), "--windows", "8",
               "--no-store", "--json", str(figures)]  # fmt: skip
    timed(command)
    ppl = json.loads(figures.read_text())["perplexity"]
    return f"{ppl['bbc']:.2f} / {ppl['wiki']:.2f}"


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
    from rankwise.core.hardware import CpuFacts, machine_line

    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after", type=float, default=60.0)
    parser.add_argument("--skip", action="append", default=[])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rankwise-processes-"))
    reference = root / "reference"
    seconds = timed(rankwise("--out", str(reference)))
    rows = [
        f"Machine: {machine_line()}; {CpuFacts.detect().describe()}",
        "",
        "| run | seconds | equal to the reference | largest difference | note |",
        "|---|---|---|---|---|",
        f"| uninterrupted | {seconds:.0f} | - | - | {megabytes(reference)} MB, "
        f"perplexity {perplexity(reference)} |",
    ]
    if "resume" not in args.skip:
        before, after = killed_then_resumed(root / "resumed", args.kill_after)
        same, worst = compare(reference, root / "resumed")
        rows.append(
            f"| killed at {before:.0f} s, then --resume | {after:.0f} (the resumed run) | "
            f"{'bit for bit' if same else 'no'} | {worst:.2e} | |"
        )
    if "torchrun" not in args.skip:
        rows += torchrun_rows(root, reference, seconds)
    if "dtype" not in args.skip:
        out = root / "bf16"
        seconds = timed(rankwise("--out", str(out), "--dtype", "bfloat16"))
        rows.append(
            f"| --dtype bfloat16 | {seconds:.0f} | - | - | {megabytes(out)} MB, "
            f"perplexity {perplexity(out)} |"
        )
    text = "\n".join([
        "# Resume, processes and saved dtype (default model, ratio 0.4)", "",
        "`python bench/processes.py`; demo-sized calibration (16 windows of 256 tokens, 4 for "
        "importance), `--merge-policy never` (merge decisions are timed, so they may differ "
        "between runs); perplexity BBC / Wikipedia on 8 windows each (`rankwise eval`).", "",
        *rows, "",
    ])  # fmt: skip
    (RESULTS / "processes.md").write_text(text)
    print(text)
    shutil.rmtree(root, ignore_errors=True)


def torchrun(out: Path, *extra: str) -> float:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
              "2", "-m", "rankwise", "compress", "default", "--ratio", "0.4", *DEMO, *extra,
              "--out", str(out)]  # fmt: skip
    return timed(launch)


def rank_changes(first: Path, second: Path) -> str:
    """How many layers the two runs gave a different rank, and the largest difference."""

    def ranks(directory: Path) -> dict[str, int | None]:
        block = json.loads((directory / "config.json").read_text())["rankwise"]
        return {layer["name"]: layer["rank"] for layer in block["layers"]}

    a, b = ranks(first), ranks(second)
    changed = [abs((a[n] or 0) - (b[n] or 0)) for n in a if a[n] != b[n]]
    return (
        f"{len(changed)} of {len(a)} layers at another rank (by at most {max(changed, default=0)})"
    )


def product_difference(first: Path, second: Path) -> float:
    """Largest relative difference of a layer's left @ right between two directories."""
    a, b = weights(first), weights(second)
    worst = 0.0
    for key in a:
        if key.endswith(".left"):
            name = key[: -len(".left")]
            one = a[key] @ a[name + ".right"]
            two = b[key] @ b[name + ".right"]
            worst = max(worst, float((one - two).norm() / one.norm()))
    return worst


def torchrun_rows(root: Path, reference: Path, one_seconds: float) -> list[str]:
    """2 processes against 1: the default run (importance, auto dtype), and a uniform float32
    run where the ranks cannot move, so the factors themselves are compared."""
    two_seconds = torchrun(root / "two")
    rows = [
        f"| torchrun, 2 processes (gloo) | {two_seconds:.0f} (1 process: {one_seconds:.0f}) | "
        f"up to summation order | {rank_changes(reference, root / 'two')} | "
        f"perplexity {perplexity(root / 'two')}; 2 cores: no speedup expected |"
    ]
    fixed = ["--allocation", "uniform", "--calib-dtype", "float32"]
    one = timed(rankwise("--out", str(root / "uniform-one"), *fixed))
    two = torchrun(root / "uniform-two", *fixed)
    worst = product_difference(root / "uniform-one", root / "uniform-two")
    rows.append(
        f"| uniform float32, 2 processes against 1 | {two:.0f} against {one:.0f} | "
        f"up to summation order | left @ right within {worst:.1e} (relative) | |"
    )
    return rows


def megabytes(directory: Path) -> str:
    return f"{sum(p.stat().st_size for p in directory.glob('*.safetensors')) / 1e6:.0f}"


if __name__ == "__main__":
    main()
