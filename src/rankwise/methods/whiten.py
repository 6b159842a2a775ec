"""Activation-whitened SVD (SVD-LLM's idea, made robust).

With G = X^T X = Q diag(lam) Q^T the layer's input gram, the output error of a replacement W' is
||(W - W') X^T||^2 = ||(W - W') Q diag(sqrt lam)||^2. So the SVD of A = W Q diag(sqrt lam),
truncated to rank r, gives the best rank-r W' for the calibration data, and its error is exactly
the sum of the dropped squared singular values of A.

No Cholesky, no inverse: eigenvalues are clamped at `eig_floor * max(lam)`, so dead input channels
and grams from fewer tokens than features still give finite, well-defined factors.
"""

from __future__ import annotations

import torch

from rankwise.errors import CalibrationError
from rankwise.methods.base import Factors, LayerStats, MethodOptions, split_singular


def whitening_basis(
    input_gram: torch.Tensor, eig_floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (in, in) and sqrt of the floored eigenvalues (in,), in float64."""
    gram = input_gram.double()
    gram = (gram + gram.T) / 2  # symmetric to rounding
    eigvals, eigvecs = torch.linalg.eigh(gram)  # (in,), (in, in)
    top = eigvals.max().clamp_min(torch.finfo(torch.float64).tiny)
    roots = eigvals.clamp_min(eig_floor * top).sqrt()  # (in,)
    return eigvecs, roots


class Whiten:
    name = "whiten"
    needs: frozenset[str] = frozenset({"input_gram"})

    def __init__(self) -> None:
        # q/k/v (and gate/up) share one input gram and are factorized one after another: keep
        # the last decomposition only, so finished blocks' grams and bases can be freed.
        self._last: tuple[torch.Tensor, float, torch.Tensor, torch.Tensor] | None = None

    def _basis(self, stats: LayerStats, eig_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        if stats.input_gram is None:
            raise CalibrationError("whiten needs calibration statistics (input_gram)")
        gram = stats.input_gram
        if self._last is None or self._last[0] is not gram or self._last[1] != eig_floor:
            self._last = (gram, eig_floor, *whitening_basis(gram, eig_floor))
        return self._last[2], self._last[3]

    def factorize(
        self, weight: torch.Tensor, stats: LayerStats, rank: int, options: MethodOptions
    ) -> Factors:
        eigvecs, roots = self._basis(stats, options.eig_floor)
        scaled = (weight.double() @ eigvecs) * roots  # (out, in): W Q diag(sqrt lam)
        # The SVD in float32 is 2x faster and exact to ~1e-6 relative; the basis stays float64.
        u, s, vh = torch.linalg.svd(scaled.float(), full_matrices=False)  # (out,k) (k,) (k,in)
        left, right_white = split_singular(u, s, vh, rank)  # (out, rank), (rank, in)
        right = (right_white.double() / roots) @ eigvecs.T  # (rank, in): undo the whitening
        dtype = weight.dtype
        return Factors(left.to(dtype), right.to(dtype), spectrum=s.float())

    def spectrum(
        self, weight: torch.Tensor, stats: LayerStats, options: MethodOptions
    ) -> torch.Tensor:
        eigvecs, roots = self._basis(stats, options.eig_floor)
        scaled = (weight.double() @ eigvecs) * roots  # (out, in)
        return torch.linalg.svdvals(scaled.float())
