"""The contract every factorization method follows.

`factorize(weight, stats, rank, options) -> Factors` is pure tensor math: no hooks, no I/O.
Methods that need calibration data say which statistics they need (`needs`), so the
orchestration gathers only those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import torch

from rankwise.model.csr import CSR


@dataclass
class LayerStats:
    """Calibration statistics of one target layer (any may be None when not gathered)."""

    input_gram: torch.Tensor | None = None  # (in, in) float64, sum of x x^T over tokens
    # (out, out) float64, sum of y y^T over tokens (y = W x): gathered instead of input_gram for
    # layers narrower out than in, by methods with `output_grams` (whiten)
    output_gram: torch.Tensor | None = None
    tokens: int = 0
    fisher: torch.Tensor | None = None  # (out, in) float32, summed squared gradients
    # (out,) float64: mean over calibration tokens of the squared loss gradient w.r.t. each
    # output unit; turns a layer's output error into an estimated loss increase (allocation)
    output_fisher: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> LayerStats:
        """The same statistics on `device` (shared grams stay shared: each moves once per call
        site that moves them; the caller moves one block's statistics at a time)."""
        moved = {
            name: None if value is None else value.to(device)
            for name, value in (
                ("input_gram", self.input_gram),
                ("output_gram", self.output_gram),
                ("fisher", self.fisher),
                ("output_fisher", self.output_fisher),
            )
        }
        return LayerStats(tokens=self.tokens, **moved)


T = TypeVar("T")


class GramCache:
    """What methods derived from the last gram they read (whiten: its eigendecomposition;
    sparse: also its metric), one entry per kind, owned by the caller.

    gate/up (and q/k/v) share one input gram and are factorized one after another, so the
    decomposition is computed once for them. Entries are keyed by the gram tensor's identity
    (the entry holds the tensor, so the identity cannot be reused) and the eigenvalue floor: a
    cached value is exactly what the computation would give. One entry per kind, so finished
    blocks' grams are freed. Whoever makes the `MethodOptions` owns it: the compression run's
    layer loop makes one per run; methods themselves keep no state between calls.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[torch.Tensor, float, object]] = {}

    def get(self, kind: str, gram: torch.Tensor, eig_floor: float, compute: Callable[[], T]) -> T:
        entry = self._entries.get(kind)
        if entry is None or entry[0] is not gram or entry[1] != eig_floor:
            entry = (gram, eig_floor, compute())
            self._entries[kind] = entry
        return entry[2]  # type: ignore[return-value]


@dataclass
class MethodOptions:
    eig_floor: float = 1e-6  # relative floor on the gram's eigenvalues (whiten)
    # sparse: shares of the layer's budget tried for nonzeros (besides none), refinement rounds
    sparse_fractions: tuple[float, ...] = (0.03, 0.06, 0.1, 0.2, 0.35, 0.5)
    sparse_rounds: int = 1
    # derived from grams, shared by the calls made with these options (see GramCache)
    cache: GramCache = field(default_factory=GramCache, repr=False, compare=False)


@dataclass
class Factors:
    """W ~ left @ right (+ sparse); `spectrum` is the method's full singular spectrum (for
    allocation). A method that fits more than a truncated spectrum (sparse) reports its own
    `rel_error` (sqrt of error / total energy in its metric)."""

    left: torch.Tensor  # (out, rank)
    right: torch.Tensor  # (rank, in)
    spectrum: torch.Tensor | None = None  # (min(out, in),) singular values in the method's metric
    sparse: CSR | None = None  # (out, in) residual added to left @ right
    rel_error: float | None = None
    # relative error after each refinement round, for methods that refine (sparse); logged
    refinement: tuple[float, ...] = ()

    def to(self, device: torch.device | str) -> Factors:
        """The factors (and residual) on `device`; the spectrum too."""
        return replace(
            self,
            left=self.left.to(device),
            right=self.right.to(device),
            spectrum=None if self.spectrum is None else self.spectrum.to(device),
            sparse=None if self.sparse is None else self.sparse.to(device),
        )

    def approximation(self) -> torch.Tensor:
        """The dense (out, in) matrix the factors (and the sparse residual) represent."""
        dense = self.left @ self.right  # (out, in)
        if self.sparse is not None:
            dense = dense + self.sparse.to_dense().to(dense.dtype)
        return dense


class Method(Protocol):
    """What the orchestration may rely on: declared capabilities, and two pure calls.

    Methods keep no state: what they derive from a gram and reuse across layers lives in the
    caller's `options.cache` (GramCache).
    """

    name: str
    needs: frozenset[str]  # subset of {"input_gram", "fisher"}
    # True: a layer narrower out than in is factorized from `output_gram` alone, so calibration
    # may gather that smaller gram instead of the input's.
    output_grams: bool

    def factorize(
        self, weight: torch.Tensor, stats: LayerStats, rank: int, options: MethodOptions
    ) -> Factors: ...

    def spectrum(
        self, weight: torch.Tensor, stats: LayerStats, options: MethodOptions
    ) -> torch.Tensor:
        """Singular values (min(out, in),) in the method's error metric: truncating to rank r
        costs sum(spectrum[r:]**2) there. Allocation reads every layer's curve from this."""
        ...


def split_singular(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate an SVD to `rank` and share sqrt(s) between both sides.

    Balanced factors have equal norms, which keeps later distillation (recovery) well conditioned.
    """
    root = s[:rank].sqrt()  # (rank,)
    left = u[:, :rank] * root  # (out, rank)
    right = root[:, None] * vh[:rank]  # (rank, in)
    return left, right
