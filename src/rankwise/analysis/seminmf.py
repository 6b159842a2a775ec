"""Semi-nonnegative matrix factorization: activations as nonnegative mixtures of features.

An MLP's activations `X` (tokens, width) are mixed in sign, so plain NMF does not apply, and
SVD's directions are orthogonal by construction and each token uses all of them with either
sign: hard to read. Semi-NMF (Ding, Li and Jordan, "Convex and semi-nonnegative matrix
factorizations", 2010) keeps the features free and only the mixing nonnegative:

    X ~ G @ F,   G (tokens, k) >= 0,   F (k, width) any sign.

Each token is then an additive mixture of a few feature directions, and a feature reads as the
tokens that use it most. The loss `||X - G F||^2` is minimised by alternating the exact least
squares for `F` with Ding et al.'s multiplicative step for `G`, which never increases it; the
starting point is k-means (cluster indicators plus 0.2), as they advise.

Pure tensor math: no hooks, no model. `features.py` gathers the activations and reads the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise.core.errors import RankwiseError

EPS = 1e-12  # keeps the multiplicative step's denominator positive
GRAM_FLOOR = 1e-10  # eigenvalues of G^T G below this fraction of the largest count as zero
KMEANS_STEPS = 10
INDICATOR_OFFSET = 0.2  # Ding et al.: G starts at the cluster indicators plus 0.2


class FeatureError(RankwiseError):
    """Activations or a feature count that semi-NMF cannot work with."""


@dataclass(frozen=True)
class SemiNMF:
    """X ~ coefficients @ features, features with unit-norm rows, ordered by share."""

    coefficients: torch.Tensor  # (tokens, k), >= 0
    features: torch.Tensor  # (k, width), unit rows
    shares: torch.Tensor  # (k,) ||G[:, i] F[i]||^2 / ||X||^2: the energy each feature carries
    errors: tuple[float, ...]  # relative error ||X - G F|| / ||X|| after each iteration

    @property
    def relative_error(self) -> float:
        return self.errors[-1]


def check_activations(acts: torch.Tensor, k: int) -> None:
    if acts.ndim != 2 or acts.numel() == 0:
        raise FeatureError(f"activations must be a non-empty (tokens, width) matrix: {acts.shape}")
    if not torch.isfinite(acts).all():
        raise FeatureError("activations hold NaN or Inf")
    if not 1 <= k <= min(acts.shape):
        raise FeatureError(f"feature count must be in [1, {min(acts.shape)}] here: {k}")
    if not acts.any():
        raise FeatureError("activations are all zero")


def positive_part(a: torch.Tensor) -> torch.Tensor:
    return a.clamp(min=0)


def negative_part(a: torch.Tensor) -> torch.Tensor:
    return (-a).clamp(min=0)


def kmeans_labels(acts: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Cluster of each row after a few Lloyd steps from k distinct random rows."""
    start = torch.randperm(acts.shape[0], generator=generator)[:k]
    centers = acts[start].clone()  # (k, width)
    labels = torch.zeros(acts.shape[0], dtype=torch.long)
    for _ in range(KMEANS_STEPS):
        labels = torch.cdist(acts, centers).argmin(dim=1)  # (tokens,)
        for c in range(k):
            members = acts[labels == c]
            if len(members):
                centers[c] = members.mean(dim=0)
    return labels


def initial_coefficients(acts: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = kmeans_labels(acts, k, generator)
    indicators = torch.nn.functional.one_hot(labels, k).to(acts.dtype)  # (tokens, k)
    return indicators + INDICATOR_OFFSET


def least_squares_features(acts: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """argmin_F ||X - G F|| = (G^T G)^+ G^T X, the (k, k) gram inverted through its
    eigendecomposition with a relative floor: a feature no token uses (a zero column of G)
    gets a zero row instead of breaking an inverse."""
    gram = coefficients.T @ coefficients  # (k, k)
    values, vectors = torch.linalg.eigh(gram)
    keep = values > GRAM_FLOOR * values.max().clamp(min=EPS)
    inverse = torch.where(keep, 1 / values.clamp(min=EPS), torch.zeros_like(values))
    return vectors @ (inverse[:, None] * (vectors.T @ (coefficients.T @ acts)))  # (k, width)


def keep_largest(features: torch.Tensor, neurons: int | None) -> torch.Tensor:
    """Winner-take-all: each feature keeps its `neurons` largest entries in magnitude, so it
    reads as a small group of co-active neurons (None: all)."""
    if neurons is None or neurons >= features.shape[1]:
        return features
    threshold = features.abs().topk(neurons, dim=1).values[:, -1:]  # (k, 1)
    return torch.where(features.abs() >= threshold, features, torch.zeros_like(features))


def coefficient_step(
    coefficients: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor
) -> torch.Tensor:
    """Ding et al.'s update: G *= sqrt(((XF^T)+ + G(FF^T)-) / ((XF^T)- + G(FF^T)+)), which keeps
    G nonnegative and never increases the loss for fixed F. `cross` = X F^T (tokens, k),
    `gram` = F F^T (k, k)."""
    up = positive_part(cross) + coefficients @ negative_part(gram)
    down = negative_part(cross) + coefficients @ positive_part(gram)
    return coefficients * torch.sqrt(up / (down + EPS))


def squared_error(
    total: torch.Tensor, coefficients: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor
) -> torch.Tensor:
    """||X - G F||^2 = ||X||^2 - 2 <G, X F^T> + <G^T G, F F^T>, without forming G F."""
    fit = (coefficients.T @ coefficients * gram).sum()
    return (total - 2 * (coefficients * cross).sum() + fit).clamp(min=0)


def normalized(coefficients: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Unit-norm feature rows, the scale moved into the coefficients (G F is unchanged)."""
    norms = torch.linalg.norm(features, dim=1)  # (k,)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return coefficients * safe, features / safe[:, None]


def semi_nmf(
    acts: torch.Tensor,
    k: int,
    iterations: int = 200,
    seed: int = 0,
    tol: float = 1e-6,
    neurons: int | None = None,
) -> SemiNMF:
    """Fit X ~ G F (G >= 0) by alternating updates; stops early once an iteration changes the
    relative error by less than `tol`. `neurons`: each feature keeps that many entries
    (winner-take-all after every F update); None keeps all, and then the loss never rises.
    Computed in float64: the activations of one layer on a few windows are small."""
    check_activations(acts, k)
    x = acts.double()  # (tokens, width)
    total = x.square().sum()
    coefficients = initial_coefficients(x, k, seed)  # (tokens, k)
    errors: list[float] = []
    for _ in range(iterations):
        features = keep_largest(least_squares_features(x, coefficients), neurons)  # (k, width)
        cross, gram = x @ features.T, features @ features.T  # (tokens, k), (k, k)
        coefficients = coefficient_step(coefficients, cross, gram)
        errors.append(float((squared_error(total, coefficients, cross, gram) / total).sqrt()))
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) < tol:
            break
    coefficients, features = normalized(coefficients, features)
    shares = coefficients.square().sum(dim=0) / total  # unit rows: ||G_i F_i||^2 = ||G_i||^2
    order = torch.argsort(shares, descending=True)
    return SemiNMF(
        coefficients[:, order].to(acts.dtype),
        features[order].to(acts.dtype),
        shares[order].to(acts.dtype),
        tuple(errors),
    )


def fit_coefficients(
    acts: torch.Tensor,
    features: torch.Tensor,
    start: torch.Tensor | None = None,
    sweeps: int = 100,
) -> tuple[torch.Tensor, float]:
    """Nonnegative coefficients of other activations in fixed features, and their relative
    error, so two models' activations can be read in the same features.

    With F fixed the problem is a nonnegative least squares per token, solved by coordinate
    descent (each feature's column exactly, clipped at 0, in turn: never worse than where it
    starts). `start`: the coefficients to start from, e.g. the reference model's on the same
    tokens, which are close when the activations are."""
    check_activations(acts, features.shape[0])
    x, f = acts.double(), features.double()
    total = x.square().sum()
    cross, gram = x @ f.T, f @ f.T  # (tokens, k), (k, k)
    coefficients = torch.zeros_like(cross) if start is None else start.double().clone()
    for _ in range(sweeps):
        for j in range(f.shape[0]):
            if gram[j, j] <= 0:
                continue  # a zero feature: its coefficient stays 0
            residual = cross[:, j] - coefficients @ gram[:, j]  # (tokens,)
            coefficients[:, j] = (coefficients[:, j] + residual / gram[j, j]).clamp(min=0)
    error = float((squared_error(total, coefficients, cross, gram) / total).sqrt())
    return coefficients.to(acts.dtype), error


def svd_relative_error(acts: torch.Tensor, k: int) -> float:
    """The best any rank-k factorization can do (Eckart-Young): semi-NMF's floor."""
    values = torch.linalg.svdvals(acts.double())
    return float(values[k:].square().sum().sqrt() / values.square().sum().sqrt())
