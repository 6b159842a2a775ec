"""Activation-whitened SVD (SVD-LLM's idea, made robust).

With G = X^T X = Q diag(lam) Q^T the layer's input gram, the output error of a replacement W' is
||(W - W') X^T||^2 = ||(W - W') Q diag(sqrt lam)||^2. So the SVD of A = W Q diag(sqrt lam),
truncated to rank r, gives the best rank-r W' for the calibration data, and its error is exactly
the sum of the dropped squared singular values of A.

No Cholesky, no inverse: eigenvalues are clamped at `eig_floor * max(lam)`, so dead input channels
and grams from fewer tokens than features still give finite, well-defined factors.

Layers no wider out than in (q/k/v/o, MLP down) take the output side instead: the left singular
vectors U of A are the eigenvectors of A A^T = W G W^T (out, out), and the truncated SVD of A is
U_r U_r^T A, so W' = U_r U_r^T W, the projection of W's outputs on their top-r principal
directions. That is the same optimum with no square root of G to floor or undo, and it skips the
eigendecomposition of G: for SmolLM2's 1536-wide MLP gram that alone took 0.5 s of every block's
~1 s of factorization. Layers narrower out than in need only W G W^T, the gram of their outputs:
calibration gathers that (out, out) gram directly where it can (`output_gram`, `output_grams`).
"""

from __future__ import annotations

import torch

from rankwise.core.errors import CalibrationError
from rankwise.methods.base import Factors, LayerStats, MethodOptions, split_singular

# singular values below this share of the largest do not balance the output side's factors
EXCITED = 1e-6


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
    output_grams = True  # layers with out < in factorize from their outputs' gram alone

    @staticmethod
    def _basis(stats: LayerStats, options: MethodOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """The gram's whitening basis, decomposed once for the layers sharing it (GramCache)."""
        gram = _gram(stats)
        floor = options.eig_floor
        return options.cache.get("basis", gram, floor, lambda: whitening_basis(gram, floor))

    def factorize(
        self, weight: torch.Tensor, stats: LayerStats, rank: int, options: MethodOptions
    ) -> Factors:
        out_features, in_features = weight.shape
        if out_features <= in_features:
            return _output_side(weight, _outputs_gram(weight, stats), rank)
        eigvecs, roots = self._basis(stats, options)
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
        if weight.shape[0] <= weight.shape[1]:
            return _output_spectrum(_outputs_gram(weight, stats))[0].float()
        eigvecs, roots = self._basis(stats, options)
        scaled = (weight.double() @ eigvecs) * roots  # (out, in)
        return torch.linalg.svdvals(scaled.float())


def _gram(stats: LayerStats) -> torch.Tensor:
    if stats.input_gram is None:
        raise CalibrationError("whiten needs calibration statistics (input_gram)")
    return stats.input_gram


def _outputs_gram(weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """W G W^T (out, out) float64: the gathered output gram, else from the input gram."""
    if stats.output_gram is not None:
        return stats.output_gram.double()
    w = weight.double()  # (out, in)
    return w @ _gram(stats).double() @ w.T


def _output_spectrum(output_gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of W S (out,), descending, and the matching eigenvectors of W G W^T
    (out, out), both float64: the principal directions of the layer's outputs."""
    output_gram = (output_gram + output_gram.T) / 2  # symmetric to rounding
    eigvals, eigvecs = torch.linalg.eigh(output_gram)  # ascending
    values = eigvals.flip(0).clamp_min(0).sqrt()  # (out,)
    return values, eigvecs.flip(1)


def _output_side(weight: torch.Tensor, output_gram: torch.Tensor, rank: int) -> Factors:
    """W' = U_r U_r^T W, shared as (U_r sqrt s) (U_r^T W / sqrt s): with G invertible these are
    the input side's factors exactly. Where s is ~0 (outputs the data never excites) the split
    is left unbalanced rather than divided by nothing; the product is the same either way."""
    spectrum, directions = _output_spectrum(output_gram)
    kept = directions[:, :rank]  # (out, rank), orthonormal
    values = spectrum[:rank]  # (rank,)
    alive = values > EXCITED * values[:1].clamp_min(torch.finfo(torch.float64).tiny)
    root = torch.where(alive, values, torch.ones_like(values)).sqrt()  # (rank,)
    left = kept * root  # (out, rank)
    right = (kept.T @ weight.double()) / root[:, None]  # (rank, in)
    dtype = weight.dtype
    return Factors(left.to(dtype), right.to(dtype), spectrum=spectrum.float())
