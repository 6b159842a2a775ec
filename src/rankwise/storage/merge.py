"""Merge policy: keep a layer factorized only where two small products beat one large one.

A rank-r factorization of an (out, in) matrix does r*(out+in) multiply-adds per token instead of
out*in, but it runs as two matrix products: two kernel launches, an intermediate (tokens, rank)
buffer, and smaller, less efficient products. Near the break-even rank the factorized layer is
slower than the dense one it replaces, and where that happens depends on the hardware and on
how many tokens go through at once (one token while decoding, hundreds while reading a prompt).

So the decision is measured, once, when a model is saved (`merge_decision`, stored in its
manifest; `rankwise.load(DIR, merge_policy="auto")` measures again): a small cost table is
timed on this machine for
every distinct (out, in) shape at a few ranks and token counts (`measure_costs`), interpolated in
rank (`CostTable`), and each layer keeps its factors only if they are not slower than the dense
product at any of the token counts (`keep_factored`, a pure function of the times, so a compressed
model is never slower than dense at any of them). The others are merged back to nn.Linear.
A layer with a sparse residual adds its CSR product's measured time to the factorized side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.errors import RankwiseError
from rankwise.model.layers import LowRankLinear, SparseLowRankLinear
from rankwise.model.modules import set_module

MergePolicy = Literal["auto", "never", "always"]
MERGE_POLICIES: tuple[str, ...] = ("auto", "never", "always")
# Rows per product the decision must hold for: batch-1 decode, batch-8 decode, a 512-token prompt.
WORKLOAD_TOKENS: tuple[int, ...] = (1, 8, 512)
# Weights timed are cut from a buffer larger than the last-level cache (see WeightPool).
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
    extra: Mapping[str, Mapping[int, float]] | None = None,
) -> dict[str, bool]:
    """Layer name -> keep factorized, for layers given as (out, in, rank), under a cost function.

    `extra[name][tokens]`: seconds the layer spends besides its two factor products (a sparse
    residual's CSR product), added to the factorized side."""
    tokens = tuple(tokens)
    extra = extra or {}

    def times(name: str, out: int, inp: int, rank: int) -> Iterable[tuple[float, float]]:
        for t in tokens:
            dense, factored = cost(out, inp, rank, t)
            yield dense, factored + extra.get(name, {}).get(t, 0.0)

    return {
        name: keep_factored(times(name, out, inp, rank))
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


class WeightPool:
    """One buffer that weights are cut from, each product at the next place (wrapping around).

    The real model streams its weights from memory while decoding; a matrix timed on cache-hot
    weights would favour the dense form. Here every timed call reads memory that no call has
    touched for the last COLD_BYTES.
    """

    def __init__(self, largest: int) -> None:
        self.data = torch.ones(COLD_BYTES // 4 + largest)  # ones: no denormals, cheap to fill
        self.cursor = 0

    def next(self, *shapes: tuple[int, int]) -> list[torch.Tensor]:
        views = []
        for rows, cols in shapes:
            if self.cursor + rows * cols > self.data.numel():
                self.cursor = 0
            views.append(self.data[self.cursor : self.cursor + rows * cols].view(rows, cols))
            self.cursor += rows * cols
        return views


# The shapes of the weights a product reads, and the product given those weights.
Product = tuple[tuple[tuple[int, int], ...], Callable[[list[torch.Tensor]], object]]


def fastest_seconds(pool: WeightPool | None, products: list[Product], repeats: int) -> list[float]:
    """Fastest call of each product, the products interleaved round by round after a warm-up.
    Products that read their own tensors name no weight shapes (and need no `pool`).

    The minimum, not the median: on a shared machine interruptions only ever add time, and
    interleaving makes a slow spell fall on every form alike.
    """
    best = [float("inf")] * len(products)
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for j, (shapes, run) in enumerate(products):
                weights = pool.next(*shapes) if shapes else []
                start = time.perf_counter()
                run(weights)
                if round_:
                    best[j] = min(best[j], time.perf_counter() - start)
    return best


def shape_products(out: int, inp: int, ranks: Iterable[int], tokens: int) -> list[Product]:
    """The dense product, then the factorized one at each rank, on a (tokens, in) input."""
    x = torch.randn(tokens, inp)  # (tokens, in)
    products: list[Product] = [(((out, inp),), lambda w: F.linear(x, w[0]))]  # (tokens, out)
    for rank in ranks:
        products.append(
            (
                ((out, rank), (rank, inp)),  # left, right
                lambda w: F.linear(F.linear(x, w[1]), w[0]),  # (tokens, rank) -> (tokens, out)
            )
        )
    return products


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
    pool = WeightPool(max((o * i + r * (o + i) for o, i, r in shapes), default=0))
    costs = {}
    for (out, inp), ranks in by_shape.items():
        grid = grid_ranks(ranks, points)
        for t in tokens:
            repeats = 3 if t > 64 else 7
            dense, *factored = fastest_seconds(pool, shape_products(out, inp, grid, t), repeats)
            costs[(out, inp, t)] = ShapeCosts(dense, grid, tuple(factored))
    return CostTable(costs)


def residual_product(module: SparseLowRankLinear, tokens: int) -> Product:
    """A sparse residual's own product (CSR times a (tokens, in) input): it reads no pool."""
    x = torch.randn(tokens, module.in_features)  # (tokens, in)
    return (), lambda _: module.sparse_product(x)  # (tokens, out)


def sparse_costs(
    model: nn.Module, tokens: Iterable[int] = WORKLOAD_TOKENS, repeats: int = 3
) -> dict[str, dict[int, float]]:
    """Fastest seconds of each sparse residual's product per token count: the part of a
    SparseLowRankLinear the factor cost table does not see."""
    sparse = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, SparseLowRankLinear) and module.nnz
    }
    costs: dict[str, dict[int, float]] = {name: {} for name in sparse}
    for t in tokens:
        products = [residual_product(module, t) for module in sparse.values()]
        for name, seconds in zip(sparse, fastest_seconds(None, products, repeats), strict=True):
            costs[name][t] = seconds
    return costs


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
    if cost is None:
        return decide(shapes, measure_costs(shapes.values()), extra=sparse_costs(model))
    return decide(shapes, cost)


def apply_merges(model: nn.Module, keep: Mapping[str, bool]) -> list[str]:
    """Replace the layers marked False by their dense nn.Linear; returns the merged names."""
    merged = [name for name, factored in keep.items() if not factored]
    for name in merged:
        set_module(model, name, model.get_submodule(name).merge())
    return merged


def apply_merge_policy(model: nn.Module, policy: str, cost: CostFn | None = None) -> list[str]:
    """Apply `policy` in place: "never" keeps every factor, "always" merges every layer."""
    return apply_merges(model, plan_merges(model, policy, cost))


def merge_decision(model: nn.Module, policy: str, machine: str) -> dict[str, object]:
    """The merge decision made once, when a model is saved, and stored in its directory.

    A decision timed at every load made the same directory load as different networks on a noisy
    machine (92.4M then 94.3M parameters); stored, every `rankwise.load` builds the same modules.
    `merged` names the layers run dense; `machine` says where the timing was taken."""
    keep = plan_merges(model, policy)
    merged = [name for name, factored in keep.items() if not factored]
    return {"policy": policy, "merged": merged, "machine": machine if policy == "auto" else None}


def apply_stored_decision(model: nn.Module, decision: Mapping[str, object] | None) -> list[str]:
    """Merge the layers a stored decision names; a directory without one keeps every factor."""
    merged = list((decision or {}).get("merged") or [])
    factored = set(factored_shapes(model))
    return apply_merges(model, {name: False for name in merged if name in factored})
