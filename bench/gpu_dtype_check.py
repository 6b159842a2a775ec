"""The compute-dtype decision on a real GPU (issue 23's CUDA clause), timed.

Prints torch's view of the device, what `--calib-dtype auto` picks there and why, and bf16 against
fp32 matrix products on it; writes the table to $OUT/gpu_dtype_check.md when OUT is set.
Compression itself does not run on CUDA yet (issue 26).

    python bench/gpu_dtype_check.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from rankwise.core.hardware import choose_dtype


def tflops(dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    choice = choose_dtype("auto", "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32, as calibration asks for it
    rows = [
        "# Compute dtype on a GPU (bench/gpu_dtype_check.py)",
        "",
        f"{name}, compute capability {major}.{minor}, torch {torch.__version__}",
        "",
        "| auto picks | reason | fp32 TFLOP/s | bf16 TFLOP/s |",
        "|---|---|---|---|",
        f"| {choice.name} | {choice.reason} | {tflops(torch.float32):.1f} | "
        f"{tflops(torch.bfloat16):.1f} |",
        "",
    ]
    text = "\n".join(rows)
    print(text)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_dtype_check.md").write_text(text)


if __name__ == "__main__":
    main()
