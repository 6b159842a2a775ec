"""Merge policy: keep a layer factorized only where two small products beat one large one.

A rank-r factorization of an (out, in) matrix does r*(out+in) multiply-adds per token instead of
out*in, but it runs as two matrix products: two kernel launches, an intermediate (tokens, rank)
buffer, and smaller, less efficient products. Near the break-even rank the factorized layer is
slower than the dense one it replaces, and where that happens depends on the hardware and on
how many tokens go through at once (one token while decoding, hundreds while reading a prompt).

So the decision is measured, once per load: a small cost table is timed on this machine for
every distinct (out, in) shape at a few ranks and token counts (`measure_costs`), interpolated in
rank (`CostTable`), and each layer keeps its factors only if they are not slower than the dense
product at any of the token counts (`keep_factored`, a pure function of the times, so a compressed
model is never slower than dense at any of them). The others are merged back to nn.Linear.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.layers import LowRankLinear
from rankwise.models import set_module

MergePolicy = Literal["auto", "never", "always"]
MERGE_POLICIES: tuple[str, ...] = ("auto", "never", "always")
# Rows per product the decision must hold for: batch-1 decode, batch-8 decode, a 512-token prompt.
WORKLOAD_TOKENS: tuple[int, ...] = (1, 8, 512)
# The real model streams its weights from memory while decoding: time the small-token products
# over enough copies of the weights to overflow the last-level cache, not on cache-hot weights.
COLD_BYTES = 64 * 2**20
GRID_POINTS = 5  # ranks timed per (out, in) shape; the others are interpolated

# (out, in, rank, tokens) -> (dense seconds, factorized seconds) for one product
CostFn = Callable[[int, int, int, int], tuple[float, float]]


class MergePolicyError(RankwiseError):
    """An unknown merge policy name."""


def check_policy(policy: str) -> str:
    if policy not in MERGE_POLICIES:
        raise MergePolicyError(f"merge policy must be one of {', '.join(MERGE_POLICIES)}: {policy}")
    return policy


def keep_factored(times: Iterable[tuple[float, float]]) -> bool:
    """(dense, factorized) seconds per workload: factorized only if it is never the slower one."""
    return all(factored <= dense for dense, factored in times)


def decide(
    shapes: Mapping[str, tuple[int, int, int]],
    cost: CostFn,
    tokens: Iterable[int] = WORKLOAD_TOKENS,
) -> dict[str, bool]:
    """Layer name -> keep factorized, for layers given as (out, in, rank), under a cost function."""
    tokens = tuple(tokens)
    return {
        name: keep_factored(cost(out, inp, rank, t) for t in tokens)
        for name, (out, inp, rank) in shapes.items()
    }


@dataclass(frozen=True)
class ShapeCosts:
    """Measured seconds of one product shape at `tokens` rows: dense, and factorized per rank."""

    dense: float
    ranks: tuple[int, ...]  # increasing
    factored: tuple[float, ...]  # seconds at each rank

    def factored_at(self, rank: int) -> float:
        """Piecewise-linear in rank between measured points, flat-extrapolated beyond them."""
        ranks, times = self.ranks, self.factored
        if rank <= ranks[0]:
            return times[0]
        for i in range(1, len(ranks)):
            if rank <= ranks[i]:
                r0, r1, t0, t1 = ranks[i - 1], ranks[i], times[i - 1], times[i]
                return t0 + (t1 - t0) * (rank - r0) / (r1 - r0)
        return times[-1]


@dataclass(frozen=True)
class CostTable:
    """Measured costs keyed by (out, in, tokens); callable as a CostFn."""

    costs: Mapping[tuple[int, int, int], ShapeCosts]

    def __call__(self, out: int, inp: int, rank: int, tokens: int) -> tuple[float, float]:
        entry = self.costs[(out, inp, tokens)]
        return entry.dense, entry.factored_at(rank)


def grid_ranks(ranks: Iterable[int], points: int = GRID_POINTS) -> tuple[int, ...]:
    """At most `points` of the given ranks, spread from the smallest to the largest."""
    distinct = sorted(set(ranks))
    if len(distinct) <= points:
        return tuple(distinct)
    picks = {distinct[round(i * (len(distinct) - 1) / (points - 1))] for i in range(points)}
    return tuple(sorted(picks))


def _median_seconds(run: Callable[[int], object], copies: int, repeats: int) -> float:
    """Median seconds of one call, cycling through `copies` weight copies (after a warm-up)."""
    for i in range(min(copies, 2)):
        run(i)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(i % copies)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _copies(nbytes: int, tokens: int) -> int:
    """Enough weight copies to defeat the cache for small-token (memory-bound) products."""
    return 1 if tokens > 64 else max(1, COLD_BYTES // max(nbytes, 1))


class WeightPool:
    """One buffer that weight copies are cut from: allocated once, not once per timing."""

    def __init__(self, largest: int) -> None:
        self.data = torch.ones(COLD_BYTES // 4 + largest)  # ones: no denormals, cheap to fill

    def take(self, copies: int, *shapes: tuple[int, int]) -> list[list[torch.Tensor]]:
        """`copies` sets of matrices of the given shapes, each set at its own place."""
        sizes = [a * b for a, b in shapes]
        chunks, offset = [], 0
        for _ in range(copies):
            views = []
            for (a, b), size in zip(shapes, sizes, strict=True):
                offset = 0 if offset + size > self.data.numel() else offset  # wrap around
                views.append(self.data[offset : offset + size].view(a, b))
                offset += size
            chunks.append(views)
        return chunks


def time_dense(pool: WeightPool, out: int, inp: int, tokens: int, repeats: int) -> float:
    copies = _copies(out * inp * 4, tokens)
    weights = pool.take(copies, (out, inp))  # (out, in) each
    x = torch.randn(tokens, inp)  # (tokens, in)
    with torch.inference_mode():
        return _median_seconds(lambda i: F.linear(x, weights[i][0]), copies, repeats)


def time_factored(
    pool: WeightPool, out: int, inp: int, rank: int, tokens: int, repeats: int
) -> float:
    copies = _copies(rank * (out + inp) * 4, tokens)
    factors = pool.take(copies, (out, rank), (rank, inp))  # left (out, rank), right (rank, in)
    x = torch.randn(tokens, inp)  # (tokens, in)

    def run(i: int) -> torch.Tensor:
        left, right = factors[i]
        return F.linear(F.linear(x, right), left)  # (tokens, rank) -> (tokens, out)

    with torch.inference_mode():
        return _median_seconds(run, copies, repeats)


def measure_costs(
    shapes: Iterable[tuple[int, int, int]],
    tokens: Iterable[int] = WORKLOAD_TOKENS,
    points: int = GRID_POINTS,
) -> CostTable:
    """Time the products behind the given (out, in, rank) layers on this machine (~1-2 s)."""
    shapes = list(shapes)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for out, inp, rank in shapes:
        by_shape.setdefault((out, inp), []).append(rank)
    costs = {}
    pool = WeightPool(max((o * i + r * (o + i) for o, i, r in shapes), default=0))
    for (out, inp), ranks in by_shape.items():
        grid = grid_ranks(ranks, points)
        for t in tokens:
            repeats = 5 if t > 64 else 15
            costs[(out, inp, t)] = ShapeCosts(
                dense=time_dense(pool, out, inp, t, repeats),
                ranks=grid,
                factored=tuple(time_factored(pool, out, inp, r, t, repeats) for r in grid),
            )
    return CostTable(costs)


def factored_shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {
        name: (m.out_features, m.in_features, m.rank)
        for name, m in model.named_modules()
        if isinstance(m, LowRankLinear)
    }


def plan_merges(model: nn.Module, policy: str, cost: CostFn | None = None) -> dict[str, bool]:
    """Layer name -> keep factorized under `policy` ("auto" measures unless `cost` is given)."""
    shapes = factored_shapes(model)
    if check_policy(policy) != "auto" or not shapes:
        return {name: policy != "always" for name in shapes}
    return decide(shapes, cost or measure_costs(shapes.values()))


def apply_merges(model: nn.Module, keep: Mapping[str, bool]) -> list[str]:
    """Replace the layers marked False by their dense nn.Linear; returns the merged names."""
    merged = [name for name, factored in keep.items() if not factored]
    for name in merged:
        set_module(model, name, model.get_submodule(name).merge())
    return merged


def apply_merge_policy(model: nn.Module, policy: str, cost: CostFn | None = None) -> list[str]:
    """Apply `policy` in place: "never" keeps every factor, "always" merges every layer."""
    return apply_merges(model, plan_merges(model, policy, cost))
