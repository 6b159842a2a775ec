"""Low rank plus sparse in one budget, fitted in the whitened (calibration output) metric.

W ~ L + S with L of rank r' and S holding k nonzeros, minimising the output error on the
calibration data, ||(W - L - S) X^T||^2 = tr(D G D^T) with D = W - L - S and G the layer's input
gram (eigenvalues floored as in `whiten`). Low rank cannot hold heavy-tailed weights (outlier
rows, columns and single large entries); a few nonzeros can, so part of the layer's budget is
better spent on them (SLTrain, LoSparse, DSFormer).

The budget is the allocator's: rank r's parameters, r (out + in). Each candidate split gives
r' < r and the most nonzeros whose CSR (values + indices, in bytes / 4) fits the rest. For each,
L0 is the whitened SVD truncated at r' (one SVD serves every candidate) and S the sparse fit of
W - L0; the split with the lowest measured error is kept and refined by alternating:
L = best rank-r' of W - S in the metric (whiten's SVD of (W - S)), then S = sparse fit of W - L.
A round is kept only when the error went down, so the error is monotone non-increasing.

The sparse fit of a residual R: the support is the k entries with the largest single-entry error
reduction (R G)_ij^2 / G_jj (the OBS saliency in the output metric), and the values on each row
solve the row's least squares exactly, G_JJ s_J = (R G)_iJ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankwise.methods.base import Factors, LayerStats, MethodOptions, split_singular
from rankwise.methods.curves import rescale_tails
from rankwise.methods.whiten import Whiten
from rankwise.model.accounting import LayerShape
from rankwise.model.csr import CSR, max_nnz, torch_csr

# Reserved per sparse layer for the safetensors header entries of its three extra tensors
# (~110 bytes each), so a sparse model's file is no larger than the pure low-rank one.
HEADER_PARAMS = 96
SOLVE_ELEMENTS = 1 << 22  # padded (rows, k, k) block per batched least-squares solve
SEARCH_PATIENCE = 3  # larger sparse shares tried after the last improvement
# Ranks, as fractions of the break-even rank out*in/(out+in), where the allocation curve measures
# the sparse fit (the curve of a run at ratio R is read mostly near (1 - R) of break-even).
CURVE_KEEPS = (0.3, 0.6)


@dataclass
class Metric:
    """One layer's output metric: ||D||^2 = tr(D G D^T), G = Q diag(roots^2) Q^T (floored)."""

    eigvecs: torch.Tensor  # (in, in) float64
    roots: torch.Tensor  # (in,) float64
    gram: torch.Tensor  # (in, in) float64, the floored gram

    @classmethod
    def from_basis(cls, gram: torch.Tensor, eigvecs: torch.Tensor, roots: torch.Tensor) -> Metric:
        """The floored gram without an (in)^3 product: only the clamped directions change."""
        gram = gram.double()
        gram = (gram + gram.T) / 2  # (in, in)
        floor = roots == roots.min()  # clamped directions (or one genuine smallest: delta ~ 0)
        basis = eigvecs[:, floor]  # (in, m)
        raw = ((gram @ basis) * basis).sum(dim=0)  # (m,) their eigenvalues before the floor
        delta = roots[floor].square() - raw  # (m,)
        return cls(eigvecs, roots, gram + (basis * delta) @ basis.T)

    def white(self, matrix: torch.Tensor) -> torch.Tensor:
        return (matrix.double() @ self.eigvecs) * self.roots  # (out, in)


@dataclass
class Fit:
    """One low-rank-plus-sparse state and its error in the metric."""

    left: torch.Tensor  # (out, r') float64
    right: torch.Tensor  # (r', in) float64
    sparse: CSR | None
    error: float


def split_budget(rank: int, out_f: int, in_f: int, fraction: float) -> tuple[int, int] | None:
    """(r', nonzeros) spending about `fraction` of rank r's parameters on the sparse part."""
    if fraction <= 0.0:
        return rank, 0
    budget = rank * (out_f + in_f)
    low = max(1, int((1.0 - fraction) * budget) // (out_f + in_f))
    if low >= rank:
        return None
    nnz = max_nnz(budget - low * (out_f + in_f) - HEADER_PARAMS, out_f, in_f)
    return (low, nnz) if nnz > 0 else None


def row_least_squares(
    target: torch.Tensor, gram: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Values on the support minimising each row's (r_i - s) G (r_i - s)^T, and the total error
    reduction. `target` is R G (out, in); (rows, cols) row-major sorted. Rows are solved in
    batches of similar support size, padded with identity."""
    counts = torch.bincount(rows, minlength=target.shape[0])  # (out,)
    starts = counts.cumsum(0) - counts  # (out,)
    values = torch.zeros(len(rows), dtype=torch.float64, device=target.device)  # (nnz,)
    active = counts.nonzero().flatten()
    active = active[torch.argsort(counts[active], stable=True)]
    reduction, begin = 0.0, 0

    def widest(end: int) -> int:
        return int(counts[active[end - 1]]) ** 2

    while begin < len(active):
        # sorted by support size: the chunk's last row is its widest
        end = min(len(active), begin + max(1, SOLVE_ELEMENTS // int(counts[active[begin]]) ** 2))
        while end - begin > 1 and (end - begin) * widest(end) > SOLVE_ELEMENTS:
            end = begin + max(1, (end - begin) // 2)
        chunk = active[begin:end]  # (n,)
        width = int(counts[chunk].max())
        positions = torch.arange(width, device=target.device)  # (k,)
        valid = positions < counts[chunk, None]  # (n, k)
        slot = torch.where(valid, starts[chunk, None] + positions, 0)  # (n, k)
        col = torch.where(valid, cols[slot], 0)  # (n, k)
        pair = valid[:, :, None] & valid[:, None, :]  # (n, k, k)
        block = torch.where(pair, gram[col[:, :, None], col[:, None, :]], 0.0)  # (n, k, k)
        block = block + torch.diag_embed((~valid).double())
        rhs = torch.where(valid, target[chunk[:, None], col], 0.0)  # (n, k)
        factor, _ = torch.linalg.cholesky_ex(block)  # (n, k, k): G_JJ is positive definite
        solution = torch.cholesky_solve(rhs[:, :, None], factor).squeeze(-1)  # (n, k)
        values[slot[valid]] = solution[valid]
        reduction += float((solution * rhs).sum())  # s^T G_JJ s = s . rhs at the optimum
        begin = end
    return values, reduction


def fit_sparse(
    residual: torch.Tensor, residual_gram: torch.Tensor, metric: Metric, nnz: int
) -> tuple[CSR, float]:
    """Best `nnz`-sparse S for the residual R (out, in) given R G; returns S and the error it
    removes."""
    out_f, in_f = residual.shape
    saliency = residual_gram.square() / metric.gram.diagonal()  # (out, in)
    picked = torch.topk(saliency.flatten(), nnz, sorted=False).indices.sort().values  # (nnz,)
    rows, cols = picked // in_f, picked % in_f
    values, reduction = row_least_squares(residual_gram, metric.gram, rows, cols)
    return CSR.from_entries(rows, cols, values, (out_f, in_f)), reduction


def low_rank_from_svd(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, metric: Metric
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors (out, r), (r, in) of the whitened SVD, the whitening undone (float64)."""
    left, right_white = split_singular(u, s, vh, rank)  # (out, r), (r, in) in whitened space
    right = (right_white.double() / metric.roots) @ metric.eigvecs.T  # (r, in)
    return left.double(), right


def with_sparse(
    weight: torch.Tensor,
    weight_gram: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    metric: Metric,
    nnz: int,
) -> Fit:
    """L fixed, S refitted from scratch on the residual W - L; the error measured exactly."""
    residual = weight - left @ right  # (out, in)
    residual_gram = weight_gram - left @ (right @ metric.gram)  # (out, in): R G
    error = float((residual * residual_gram).sum())
    if nnz == 0:
        return Fit(left, right, None, error)
    sparse, reduction = fit_sparse(residual, residual_gram, metric, nnz)
    return Fit(left, right, sparse, error - reduction)


def refine(
    weight: torch.Tensor,
    weight_gram: torch.Tensor,
    white: torch.Tensor,
    fit: Fit,
    metric: Metric,
    rounds: int,
) -> tuple[Fit, list[float]]:
    """Alternate L = best rank-r' of W - S, S = sparse fit of W - L; keep only improving rounds."""
    history = [fit.error]
    if fit.sparse is None:
        return fit, history
    rank, nnz = fit.left.shape[1], fit.sparse.nnz
    for _ in range(rounds):
        matrix = torch_csr(
            fit.sparse.crow_indices, fit.sparse.col_indices, fit.sparse.values, fit.sparse.shape
        )
        target = white - torch.sparse.mm(matrix, metric.eigvecs) * metric.roots  # (W - S) white
        u, s, vh = torch.linalg.svd(target.float(), full_matrices=False)  # (out,k) (k,) (k,in)
        left, right = low_rank_from_svd(u, s, vh, rank, metric)
        candidate = with_sparse(weight, weight_gram, left, right, metric, nnz)
        if not candidate.error < fit.error:
            break
        fit = candidate
        history.append(fit.error)
    return fit, history


def curve_ranks(out_f: int, in_f: int, keeps: tuple[float, ...] = CURVE_KEEPS) -> list[int]:
    """Distinct ranks at `keeps` of the break-even rank, each at least 1 and below the smallest
    side (ranks that leave the layer a budget to split)."""
    break_even = LayerShape("", out_f, in_f).break_even_rank
    top = min(out_f, in_f) - 1
    return sorted({min(top, max(1, round(k * break_even))) for k in keeps} - {0})


def scaled_spectrum(spectrum: torch.Tensor, ranks: list[int], ratios: list[float]) -> torch.Tensor:
    """Singular values whose squared tails are `spectrum`'s times an error ratio that is 1 at
    rank 0, `ratios[i]` at `ranks[i]`, log-linear between and held beyond the last rank.

    This is how the allocator sees the sparse fit: truncating to rank r costs the sparse fit's
    error at r's budget, sum(result[r:]**2), measured at a few ranks and interpolated."""
    logs = [0.0, *(math.log(min(max(r, 1e-12), 1.0)) for r in ratios)]
    gains = rescale_tails(spectrum.double().square(), [0, *ranks], logs)  # (k,)
    return gains.sqrt().to(spectrum.dtype)


@dataclass
class Layer:
    """One weight prepared in its output metric: the inputs of every split and refinement."""

    metric: Metric
    w: torch.Tensor  # (out, in) float64
    weight_gram: torch.Tensor  # (out, in): W G
    white: torch.Tensor  # (out, in): W in the whitened basis
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # of `white`: (out,k) (k,) (k,in)
    total: float  # ||W||^2 in the metric

    def split(self, rank: int, options: MethodOptions) -> tuple[Fit, Fit]:
        """(best split, pure low rank) within rank `rank`'s budget."""
        return Sparse.choose_split(self.w, self.weight_gram, self.svd, self.metric, rank, options)


class Sparse(Whiten):
    """Whitened low rank plus a sparse residual, the split chosen per layer by measured error.

    The allocator gives each layer a rank, whose parameters are this method's budget for factors,
    values and indices together. Its curve (`spectrum`) is whiten's, scaled by how much lower the
    sparse fit's error measured at a few ranks (`CURVE_KEEPS`): a layer whose error sits in a few
    entries costs less to cut, so importance allocation gives its rank to others."""

    name = "sparse"
    output_grams = False  # the sparse residual is fitted in the input's whitened metric

    def metric(self, stats: LayerStats, options: MethodOptions) -> Metric:
        eigvecs, roots = self._basis(stats, options)  # raises without a gram
        gram = stats.input_gram
        assert gram is not None  # _basis checked it

        def build() -> Metric:
            return Metric.from_basis(gram, eigvecs, roots)

        return options.cache.get("metric", gram, options.eig_floor, build)

    @staticmethod
    def choose_split(
        w: torch.Tensor,
        weight_gram: torch.Tensor,
        svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        metric: Metric,
        rank: int,
        options: MethodOptions,
    ) -> tuple[Fit, Fit]:
        """The split with the lowest measured error, and the pure low-rank fit it started from.

        Searched upwards from pure low rank: each larger sparse share is fitted exactly and the
        search stops after `SEARCH_PATIENCE` shares in a row that do not improve (the error is
        near unimodal in the share; ranking the shares by a cheap single-entry estimate was
        tried first: it overrated large ones)."""
        best = pure = with_sparse(w, weight_gram, *low_rank_from_svd(*svd, rank, metric), metric, 0)
        misses = 0
        for fraction in sorted(options.sparse_fractions):
            split = split_budget(rank, *w.shape, fraction)
            if split is None or split[1] == 0:
                continue
            left, right = low_rank_from_svd(*svd, split[0], metric)
            fit = with_sparse(w, weight_gram, left, right, metric, split[1])
            misses = 0 if fit.error < best.error else misses + 1
            best = fit if fit.error < best.error else best
            if misses == SEARCH_PATIENCE:
                break
        return best, pure

    def layer(self, weight: torch.Tensor, stats: LayerStats, options: MethodOptions) -> Layer:
        """What every split of this weight is fitted from (one whitened SVD serves them all)."""
        metric = self.metric(stats, options)
        w = weight.double()  # (out, in)
        weight_gram = w @ metric.gram  # (out, in): W G
        white = metric.white(w)  # (out, in)
        u, s, vh = torch.linalg.svd(white.float(), full_matrices=False)  # (out,k) (k,) (k,in)
        total = float((w * weight_gram).sum())
        return Layer(metric, w, weight_gram, white, (u, s, vh), total)

    def spectrum(
        self, weight: torch.Tensor, stats: LayerStats, options: MethodOptions
    ) -> torch.Tensor:
        """The allocation curve: whiten's spectrum, its tails scaled by the measured ratio of the
        best split's error to pure low rank's at each of `curve_ranks` (no refinement rounds)."""
        layer = self.layer(weight, stats, options)
        ranks = curve_ranks(*weight.shape)
        ratios = []
        for rank in ranks:
            best, pure = layer.split(rank, options)
            # nothing left to fit (exactly low rank): the ratio would be rounding noise
            exact = pure.error <= 1e-9 * layer.total
            ratios.append(1.0 if exact else best.error / pure.error)
        return scaled_spectrum(layer.svd[1], ranks, ratios)

    def factorize(
        self, weight: torch.Tensor, stats: LayerStats, rank: int, options: MethodOptions
    ) -> Factors:
        layer = self.layer(weight, stats, options)
        best, _ = layer.split(rank, options)
        best, history = refine(
            layer.w, layer.weight_gram, layer.white, best, layer.metric, options.sparse_rounds
        )
        rel = [max(e, 0.0) ** 0.5 / max(layer.total, 1e-300) ** 0.5 for e in history]
        dtype = weight.dtype
        sparse = best.sparse
        if sparse is not None:
            sparse = CSR(
                sparse.crow_indices, sparse.col_indices, sparse.values.to(dtype), sparse.shape
            )
        return Factors(
            best.left.to(dtype),
            best.right.to(dtype),
            spectrum=layer.svd[1].float(),
            sparse=sparse,
            rel_error=rel[-1],
            refinement=tuple(rel),
        )
