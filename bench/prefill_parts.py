"""Where a 1 x 512 prefill spends its time, compressed model against dense, and the ceiling that
leaves for the speed-up.

The multiply-add bound `rankwise bench` prints assumes every product runs at the same rate. This
script times the parts instead, each model in alternating rounds (minimum of 3 forwards per
round, median over rounds): the whole forward, the body without the LM head (`base_model`), and
every targeted linear alone on a (1, 512, in) input. What the linears do not explain (attention,
norms, rotary embedding, elementwise ops, the head) runs the same code in both models. So the
ceiling for the whole forward, were every factor as fast as its multiply-adds, is

    dense_full / (dense_full - dense_linears + dense_linears * mac_ratio)

Writes bench/results/prefill_parts.md. Run it on a quiet machine:

    python bench/prefill_parts.py /tmp/models/w40
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rankwise.evaluation.speed import vocab_size
from rankwise.model.layers import LowRankLinear
from rankwise.storage.saved import load_compressed
from rankwise.storage.sources import load_model

RESULTS = Path(__file__).parent / "results"


def fastest(fn: Callable[[], object], calls: int = 3) -> float:
    best = float("inf")
    with torch.inference_mode():
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best


def linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear of the blocks (factorized or dense), not the output head."""
    head = model.get_output_embeddings()
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, LowRankLinear)) and m is not head
    }


def macs(module: nn.Module) -> int:
    if isinstance(module, LowRankLinear):
        return module.rank * (module.in_features + module.out_features)
    return module.weight.numel()


def linear_seconds(model: nn.Module, tokens: int) -> dict[str, float]:
    """Seconds per family of linears (q_proj, up_proj, ...), each layer timed alone."""
    by_family: dict[str, float] = {}
    for name, module in linears(model).items():
        x = torch.randn(1, tokens, module.in_features)  # (1, tokens, in)
        with torch.inference_mode():
            module(x)  # warm-up, no graph
        family = name.rsplit(".", 1)[-1]
        by_family[family] = by_family.get(family, 0.0) + fastest(lambda m=module, x=x: m(x))
    return by_family


def parts(model: nn.Module, ids: torch.Tensor) -> dict[str, float]:
    body = model.base_model
    return {
        "full": fastest(lambda: model(input_ids=ids, use_cache=False)),
        "body": fastest(lambda: body(input_ids=ids, use_cache=False)),
    }


def measure(path: str, rounds: int, tokens: int) -> tuple[dict, dict, dict, dict, float]:
    model = load_compressed(path, merge_policy="auto").model
    dense = load_model("default").model
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size(dense), (1, tokens), generator=generator)  # (1, tokens)
    runs: dict[str, list[dict[str, float]]] = {"model": [], "dense": []}
    for round_ in range(rounds):
        order = [("model", model), ("dense", dense)]
        for name, m in order if round_ % 2 == 0 else order[::-1]:
            runs[name].append(parts(m, ids))
    medians = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    model_linears, dense_linears = linear_seconds(model, tokens), linear_seconds(dense, tokens)
    dense_macs = sum(macs(m) for m in linears(dense).values())
    mac_ratio = sum(macs(m) for m in linears(model).values()) / dense_macs
    return medians["model"], medians["dense"], model_linears, dense_linears, mac_ratio


def report(path: str, rounds: int, tokens: int) -> str:
    model, dense, model_lin, dense_lin, mac_ratio = measure(path, rounds, tokens)
    lin_m, lin_d = sum(model_lin.values()), sum(dense_lin.values())
    ceiling = dense["full"] / (dense["full"] - lin_d + lin_d * mac_ratio)
    ms = 1000.0
    rows = [
        ("whole forward", model["full"], dense["full"]),
        ("LM head (whole - body)", model["full"] - model["body"], dense["full"] - dense["body"]),
        ("body (base_model)", model["body"], dense["body"]),
        ("block linears, each timed alone", lin_m, lin_d),
        ("body - linears (attention, norms, ...)", model["body"] - lin_m, dense["body"] - lin_d),
    ]
    lines = [
        f"### {path} against the dense default, 1 x {tokens} prefill",
        "",
        f"{torch.get_num_threads()} threads, median over {rounds} alternating rounds of the "
        "fastest of 3 forwards; linears at (1, tokens, in), the fastest of 3 calls each.",
        "",
        "| part | model ms | dense ms | dense / model |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {m * ms:.1f} | {d * ms:.1f} | {d / m:.3f}x |" for n, m, d in rows]
    lines += [
        "",
        "| linears | model ms | dense ms | time ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {f} | {model_lin[f] * ms:.1f} | {dense_lin[f] * ms:.1f} | "
        f"{model_lin[f] / dense_lin[f]:.3f} |"
        for f in dense_lin
    ]
    lines += [
        "",
        f"Linears: time ratio {lin_m / lin_d:.3f}, multiply-add ratio {mac_ratio:.3f} (after the "
        f"merge policy). Whole forward: **{dense['full'] / model['full']:.3f}x**; ceiling with "
        f"every linear at its multiply-add ratio and the rest unchanged: **{ceiling:.3f}x**.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a compressed model directory (SmolLM2-135M, the default)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "prefill_parts.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = report(args.model, args.rounds, args.tokens)
    print(text)
    args.out.write_text("# Prefill by parts\n\n" + text)


if __name__ == "__main__":
    main()
