"""Modular decomposition of the MLP (MoDeGPT, ICLR 2025): keep k of its d_ff channels.

An MLP computes y = W_down z with z = act(W_gate x) * (W_up x) (or act(W_fc x)): every
intermediate channel i is made by row i of the expanding matrices alone and read by column i of
W_down alone, and the nonlinearity acts channel by channel. So dropping a set of channels leaves
three *narrower dense* matrices (gate/up lose rows, down loses columns): no factor pair, no added
parameters, and the products run as plain GEMMs of fewer rows.

Which channels. With Z (tokens, d_ff) the intermediate activations on the calibration text and
C = Z^T Z (the input gram of W_down, which calibration already gathers in float64), the score of
channel i is its ridge leverage diag(C (C + lambda I)^-1)_i (how much of the activations' span only
it carries; lambda = 1% of the mean diagonal) times ||W_down[:, i]||^2 C_ii (the energy it sends to
the output). The k best are kept (Nystrom column selection; measured against whitened factors at
equal parameters in /work/shared/notes/mlp-width-vs-factors.md).

The down projection is refitted on the kept channels S by least squares of the dense output:
W_down' = W_down C[:, S] C[S, S]^+, the best map from the kept channels to the dense output on the
calibration tokens. The error of keeping the first k channels of an order is exact in the metric of
C for every k at once, from one Cholesky factor of the reordered gram (`width_gains`, up to the
ridge that makes a singular gram factorizable): what the allocator compares with whiten's curves.

Every other target of a `modular` run (attention) is factorized as `whiten` does: `Modular` is
whiten with the input grams kept for the down projection (the orchestration, block by block, is
pipeline/modular.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankwise.core.errors import CalibrationError
from rankwise.methods.whiten import Whiten

# ridge of the leverage scores, as a fraction of the mean diagonal of C (the note's lambda)
LEVERAGE_RIDGE = 0.01
# ridges of the least-squares refit and of the curves' Cholesky, relative to the mean diagonal,
# tried in turn until the factorization succeeds: a pseudo-inverse to rounding (a gram from fewer
# tokens than channels is singular, and its float32-accumulated null space is not exactly >= 0)
JITTERS = (1e-9, 1e-7, 1e-5, 1e-3, 1e-1)


class Modular(Whiten):
    """`--method modular`: MLPs narrowed by channel selection (pipeline/modular.py), every other
    target factorized exactly as `whiten` does.

    `output_grams` is False: the MLP's down projection needs its *input* gram, the correlation of
    the intermediate channels, which whiten would replace by the smaller gram of its outputs."""

    name = "modular"
    output_grams = False


@dataclass(frozen=True)
class ChannelSelection:
    """The channels an MLP keeps and its refitted down projection."""

    kept: torch.Tensor  # (k,) int64, ascending channel indices
    down: torch.Tensor  # (out, k) refitted W_down, the dtype of the weight given
    rel_error: float  # sqrt(output error / output energy) on the calibration tokens


def _symmetric(gram: torch.Tensor) -> torch.Tensor:
    gram = gram.double()
    return (gram + gram.T) / 2  # symmetric to rounding


def _mean_diagonal(gram: torch.Tensor) -> float:
    return max(float(gram.diagonal().mean()), torch.finfo(torch.float64).tiny)


def check_gram(gram: torch.Tensor | None, down: torch.Tensor) -> torch.Tensor:
    """The (d_ff, d_ff) float64 gram of the down projection's inputs, or a CalibrationError."""
    if gram is None:
        raise CalibrationError("modular needs the input gram of the MLP's down projection")
    if gram.shape != (down.shape[1], down.shape[1]):
        raise CalibrationError(
            f"gram {tuple(gram.shape)} does not match the down projection {tuple(down.shape)}"
        )
    return _symmetric(gram)


def ridge_leverage(gram: torch.Tensor, ridge: float = LEVERAGE_RIDGE) -> torch.Tensor:
    """diag(C (C + lambda I)^-1) (d_ff,) float64 in [0, 1), lambda = ridge * mean diag(C).

    With C = Q diag(mu) Q^T: sum_j Q_ij^2 mu_j / (mu_j + lambda). A channel whose activation
    no other channel can express scores near 1; one duplicated by others shares its leverage."""
    gram = _symmetric(gram)
    lam = ridge * _mean_diagonal(gram)
    mu, q = torch.linalg.eigh(gram)  # (d_ff,), (d_ff, d_ff)
    mu = mu.clamp_min(0.0)
    return (q.square() * (mu / (mu + lam))).sum(dim=1)  # (d_ff,)


def channel_scores(
    gram: torch.Tensor, down: torch.Tensor, ridge: float = LEVERAGE_RIDGE
) -> torch.Tensor:
    """Score (d_ff,) float64 of each channel: ridge leverage x ||W_down[:, i]||^2 x C_ii."""
    gram = check_gram(gram, down)
    column_energy = down.double().square().sum(dim=0)  # (d_ff,)
    return ridge_leverage(gram, ridge) * column_energy * gram.diagonal().clamp_min(0.0)


def channel_order(gram: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Channels (d_ff,) int64, best score first (ties by index: deterministic)."""
    scores = channel_scores(gram, down)
    return torch.sort(-scores, stable=True).indices


def ridged_cholesky(matrix: torch.Tensor, scale: float) -> torch.Tensor:
    """Lower Cholesky factor of `matrix` + the smallest of JITTERS x `scale` on the diagonal
    that makes it positive definite (float64)."""
    eye = torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
    for jitter in JITTERS:
        chol, info = torch.linalg.cholesky_ex(matrix + jitter * scale * eye)
        if int(info) == 0:
            return chol
    raise CalibrationError("the MLP's channel gram is not a gram (no ridge makes it definite)")


def refit_down(gram: torch.Tensor, down: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """W_down C[:, S] C[S, S]^+ (out, k): least squares of the dense output on channels S.

    With C = Z^T Z: argmin_W' ||Z W_down^T - Z_S W'^T||^2. C[S, :] W_down^T lies in the range of
    C[S, S], so the ridge (`ridged_cholesky`) only decides the null directions, to ~0."""
    gram = check_gram(gram, down)
    rhs = gram[kept] @ down.double().T  # (k, out) C[S, :] W_down^T
    chol = ridged_cholesky(gram[kept][:, kept], _mean_diagonal(gram))  # of C[S, S] (k, k)
    return torch.cholesky_solve(rhs, chol).T.to(down.dtype)  # (out, k)


def output_error(
    gram: torch.Tensor, down: torch.Tensor, kept: torch.Tensor, refitted: torch.Tensor
) -> float:
    """Relative output error sqrt(||Z W^T - Z_S W'^T||^2 / ||Z W^T||^2) from the gram alone."""
    gram = check_gram(gram, down)
    w, w_kept = down.double(), refitted.double()  # (out, d_ff), (out, k)
    total = float(((w @ gram) * w).sum())  # tr(W C W^T)
    cross = float(((w_kept @ gram[kept]) * w).sum())  # tr(W' C[S, :] W^T)
    kept_energy = float(((w_kept @ gram[kept][:, kept]) * w_kept).sum())  # tr(W' C_SS W'^T)
    error = max(total - 2 * cross + kept_energy, 0.0)
    return math.sqrt(error / total) if total > 0 else 0.0


def width_gains(gram: torch.Tensor, down: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Output error removed by each channel of `order` (d_ff,) float64, kept after the ones before.

    With the reordered gram C_p = L L^T (Cholesky), the projection of the outputs on the first k
    channels (the least-squares refit) is L[:, :k] L[:, :k]^T in the metric of C, so the error of
    keeping k channels is total - sum_{j<k} ||W_p L[:, j]||^2, for every k from one factorization.
    The gains sum to the total output energy tr(W C W^T) (jitter included): keeping every channel
    is exact."""
    gram = check_gram(gram, down)
    chol = ridged_cholesky(gram[order][:, order], _mean_diagonal(gram))  # (d_ff, d_ff) lower
    projected = down.double()[:, order] @ chol  # (out, d_ff): W_p L
    return projected.square().sum(dim=0)  # (d_ff,)


def width_errors(gains: torch.Tensor) -> torch.Tensor:
    """Relative output error (d_ff + 1,) of keeping k = 0..d_ff channels, from `width_gains`."""
    total = gains.sum().clamp_min(torch.finfo(torch.float64).tiny)
    remaining = torch.cat([gains.new_zeros(1), gains.cumsum(0)])  # (d_ff + 1,) kept energy
    return ((total - remaining).clamp_min(0.0) / total).sqrt()


def width_curve(gram: torch.Tensor, down: torch.Tensor, widths: list[int]) -> list[float]:
    """Relative output error of keeping each of `widths` channels (score order, refitted)."""
    errors = width_errors(width_gains(gram, down, channel_order(gram, down)))
    return [float(errors[k]) for k in widths]


def select_channels(gram: torch.Tensor, down: torch.Tensor, width: int) -> ChannelSelection:
    """Keep the `width` best channels of an MLP and refit its down projection on them."""
    d_ff = down.shape[1]
    if not 1 <= width <= d_ff:
        raise ValueError(f"width {width} outside 1..{d_ff}")
    order = channel_order(gram, down)
    kept = torch.sort(order[:width]).values  # (k,) ascending: the channels keep their order
    refitted = refit_down(gram, down, kept)
    return ChannelSelection(kept, refitted, output_error(gram, down, kept, refitted))
