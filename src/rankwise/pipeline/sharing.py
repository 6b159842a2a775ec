"""Under torchrun: which rank factorizes each layer, and its factors sent to every rank.

Every rank holds the same (reduced) statistics, so any of them could factorize any layer; each
layer is factorized once, by the rank `owners_by_cost` gives it (the largest layers first, each
to the least loaded rank), and `share` broadcasts the result: a small header (rank, nonzeros,
lengths, dtypes), then the tensors. Every rank calls these in the same order.
"""

from __future__ import annotations

import math

import torch

from rankwise.core import parallel
from rankwise.methods import Factors
from rankwise.model.accounting import LayerShape
from rankwise.model.csr import CSR

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int16, torch.int32)


def owners_by_cost(shapes: list[LayerShape], ranks: int) -> dict[str, int]:
    """Layer name -> the rank that factorizes it: an SVD of (out, in) costs about
    out * in * min(out, in); the costliest layers are placed first, each on the least loaded
    rank (ties: the lowest rank), the same on every rank."""
    load = [0.0] * ranks
    owners: dict[str, int] = {}
    costly_first = sorted(shapes, key=lambda s: -cost(s))
    for shape in costly_first:
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[shape.name] = rank
        load[rank] += cost(shape)
    return owners


def cost(shape: LayerShape) -> float:
    return float(
        shape.out_features * shape.in_features * min(shape.out_features, shape.in_features)
    )


def share(factors: Factors | None, owner: int, shape: LayerShape, device: torch.device) -> Factors:
    """The owner's factors on every rank (`factors` is None except on the owner)."""
    here = parallel.world()
    mine = here.rank == owner
    header = torch.zeros(10, dtype=torch.int64, device=device)
    if mine:
        assert factors is not None, "the owner factorized the layer"
        header[:] = torch.tensor(describe(factors), dtype=torch.int64)
    parallel.broadcast(header, owner)
    rank, nnz, spectrum_len, rounds, left_dtype, right_dtype, spectrum_dtype = header[:7].tolist()
    sparse_dtype, index_dtype, has_error = header[7:].tolist()
    out_f, in_f = shape.out_features, shape.in_features
    home = factors.left.device if mine and factors is not None else torch.device("cpu")

    def send(tensor: torch.Tensor | None, size: tuple[int, ...], kind: int) -> torch.Tensor:
        wire = torch.int32 if DTYPES[kind] == torch.int16 else DTYPES[kind]  # gloo has no int16
        buffer = (
            tensor.to(device=device, dtype=wire)
            if mine and tensor is not None
            else torch.empty(size, dtype=wire, device=device)
        )
        return parallel.broadcast(buffer.contiguous(), owner).to(home, DTYPES[kind])

    left = send(factors.left if mine else None, (out_f, rank), left_dtype)
    right = send(factors.right if mine else None, (rank, in_f), right_dtype)
    spectrum = None
    if spectrum_len:
        spectrum = send(factors.spectrum if mine else None, (spectrum_len,), spectrum_dtype)
    sparse = None
    if nnz:
        theirs = factors.sparse if mine else None
        crow = send(None if theirs is None else theirs.crow_indices, (out_f + 1,), 5)
        cols = send(None if theirs is None else theirs.col_indices, (nnz,), index_dtype)
        values = send(None if theirs is None else theirs.values, (nnz,), sparse_dtype)
        sparse = CSR(crow, cols, values, (out_f, in_f))
    floats = torch.zeros(1 + rounds, dtype=torch.float64, device=device)
    if mine:
        assert factors is not None
        error = factors.rel_error if factors.rel_error is not None else math.nan
        floats[:] = torch.tensor([error, *factors.refinement], dtype=torch.float64)
    values_ = parallel.broadcast(floats, owner).tolist()
    return Factors(
        left, right, spectrum, sparse,
        rel_error=values_[0] if has_error else None, refinement=tuple(values_[1:]),
    )  # fmt: skip


def describe(factors: Factors) -> list[int]:
    """The header `share` sends before the tensors."""
    sparse = factors.sparse
    return [
        factors.left.shape[1],
        0 if sparse is None else sparse.nnz,
        0 if factors.spectrum is None else len(factors.spectrum),
        len(factors.refinement),
        DTYPES.index(factors.left.dtype),
        DTYPES.index(factors.right.dtype),
        DTYPES.index(factors.spectrum.dtype) if factors.spectrum is not None else 0,
        DTYPES.index(sparse.values.dtype) if sparse is not None else 0,
        DTYPES.index(sparse.col_indices.dtype) if sparse is not None else 5,
        int(factors.rel_error is not None),
    ]


def agree_ranks(
    ranks: dict[str, int | None], names: list[str], device: torch.device
) -> dict[str, int | None]:
    """Rank 0's allocation on every rank (each computed it from the same statistics; this
    makes sure a last-bit difference cannot split the ranks' plans)."""
    if parallel.world().size == 1:
        return ranks
    values = torch.tensor([-1 if ranks[n] is None else ranks[n] for n in names], device=device)
    agreed = parallel.broadcast(values, 0).tolist()
    return {n: None if r < 0 else int(r) for n, r in zip(names, agreed, strict=True)}
