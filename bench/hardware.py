"""What this CPU multiplies fast, and what `--calib-dtype auto` picks on it.

Times a (2048 x 576) @ (576 x 1536) product (SmolLM2's MLP up projection on 4 windows of 512
tokens) in float32 and bfloat16, forward and backward, and prints the auto choice with its reason.
Run it as is, and under the AVX2 emulation of an AVX-512 machine:

    python bench/hardware.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/hardware.py --no-mkldnn

Prints one markdown row per run (append it to bench/results/hardware.md by hand or with --append).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from rankwise.core.hardware import choose_dtype, machine_line

RESULTS = Path(__file__).parent / "results"
HEADER = (
    "| machine | environment | fp32 GFLOP/s | bf16 GFLOP/s | fp32 fwd+bwd | bf16 fwd+bwd | auto |"
)


def gflops(dtype: torch.dtype, backward: bool, repeats: int = 3) -> float:
    a = torch.randn(2048, 576, dtype=dtype, requires_grad=backward)
    b = torch.randn(576, 1536, dtype=dtype, requires_grad=backward)
    flop = 2 * 2048 * 576 * 1536 * (3 if backward else 1)

    def once() -> None:
        out = a @ b
        if backward:
            out.sum().backward()

    once()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return flop / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-mkldnn", action="store_true", help="torch's own bf16 GEMM path")
    parser.add_argument("--append", action="store_true", help="append the row to hardware.md")
    args = parser.parse_args()
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    env = " ".join(
        f"{k}={os.environ[k]}"
        for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
        if k in os.environ
    ) + (" mkldnn off" if args.no_mkldnn else "")
    f32, bf16 = gflops(torch.float32, False), gflops(torch.bfloat16, False)
    f32b, bf16b = gflops(torch.float32, True, 2), gflops(torch.bfloat16, True, 1)
    choice = choose_dtype("auto")
    row = (
        f"| {machine_line()} | {env.strip() or 'native'} | {f32:.1f} | {bf16:.1f} | "
        f"{f32b:.1f} | {bf16b:.1f} | {choice.name} ({choice.reason}) |"
    )
    print(HEADER)
    print("|---|---|---|---|---|---|---|")
    print(row)
    if args.append:
        with (RESULTS / "hardware.md").open("a") as file:
            file.write(row + "\n")


if __name__ == "__main__":
    main()
