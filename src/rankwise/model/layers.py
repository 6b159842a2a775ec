"""LowRankLinear: an nn.Linear stored as two factors, in -> rank -> out (SparseLowRankLinear: plus
a sparse residual in CSR form).

It keeps the Linear's interface (`in_features`, `out_features`, a `weight` that rebuilds the dense
matrix, `merge()` back to nn.Linear) so code that inspects linears keeps working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.model.csr import CSR, index_dtype, index_params, sparse_apply, torch_csr


def saves_parameters(rank: int, out_features: int, in_features: int) -> bool:
    """A rank-r factorization costs r*(out+in); it pays only below out*in/(out+in)."""
    return rank * (out_features + in_features) < out_features * in_features


class LowRankLinear(nn.Module):
    """y = left @ (right @ x) + bias, with left (out, rank) and right (rank, in)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.right = nn.Parameter(torch.empty(rank, in_features, dtype=dtype))  # (rank, in)
        self.left = nn.Parameter(torch.empty(out_features, rank, dtype=dtype))  # (out, rank)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(
        cls, left: torch.Tensor, right: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        out_features, rank = left.shape
        layer = cls(right.shape[1], out_features, rank, bias=bias is not None, dtype=left.dtype)
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two GEMMs and nothing else: F.linear views (..., in) as 2-D and hands the transposed
        # factor to BLAS as a flag, so no operand is copied (profiled: mm, then mm/addmm).
        hidden = F.linear(x, self.right)  # (..., rank)
        return F.linear(hidden, self.left, self.bias)  # (..., out)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) matrix the factors represent."""
        return self.left @ self.right

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def merge(self) -> nn.Linear:
        """Back to a plain nn.Linear holding left @ right."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, dtype=self.left.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


def _kernel(values: torch.Tensor) -> torch.Tensor:
    """Values in a dtype torch's CPU CSR kernels multiply: bfloat16/float16 (a block copied to
    the calibration dtype during sequential calibration) go to float32."""
    return values if values.dtype in (torch.float32, torch.float64) else values.float()


class SparseLowRankLinear(LowRankLinear):
    """y = left @ (right @ x) + S @ x + bias, with S (out, in) a sparse residual in CSR form.

    Stored compactly: `crow_indices` (out + 1,) int32, `col_indices` (nnz,) int16 when the layer
    has at most 32767 inputs (int32 otherwise), `values` (nnz,) a parameter like the factors. The
    torch CSR tensor used in forward (int32 columns) is built once and rebuilt only when the
    stored tensors change (load_state_dict, in-place edits), so no per-call upcast.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, rank, bias=bias, dtype=dtype)
        self.nnz = nnz
        self.values = nn.Parameter(torch.zeros(nnz, dtype=dtype))  # (nnz,)
        self.register_buffer("crow_indices", torch.zeros(out_features + 1, dtype=torch.int32))
        self.register_buffer("col_indices", torch.zeros(nnz, dtype=index_dtype(in_features)))
        self._matrix: tuple[tuple[int, ...], torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(self._drop_cached_matrix)

    @classmethod
    def from_parts(
        cls, left: torch.Tensor, right: torch.Tensor, sparse: CSR, bias: torch.Tensor | None = None
    ) -> SparseLowRankLinear:
        out_features, rank = left.shape
        layer = cls(
            right.shape[1], out_features, rank, sparse.nnz, bias=bias is not None, dtype=left.dtype
        )
        with torch.no_grad():
            layer.left.copy_(left)
            layer.right.copy_(right)
            layer.values.copy_(sparse.values)
            layer.crow_indices.copy_(sparse.crow_indices)
            layer.col_indices.copy_(sparse.col_indices)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def _drop_cached_matrix(self, *_: object) -> None:
        self._matrix = None

    def _sparse_matrix(self) -> torch.Tensor:
        # The cached CSR shares `values` and `crow_indices` (same dtypes); only the columns are
        # an int32 copy. Keyed by storage (a move or dtype change rebuilds it); loading, which
        # copies in place, drops it through the load hook.
        shape = (self.out_features, self.in_features)
        if torch.is_grad_enabled() and self.values.requires_grad:
            # training (recovery): a fresh CSR each call, so the gradient reaches `values`
            return torch_csr(self.crow_indices, self.col_indices, _kernel(self.values), shape)
        key = tuple(t.data_ptr() for t in (self.values, self.crow_indices, self.col_indices))
        if self._matrix is None or self._matrix[0] != key:
            matrix = torch_csr(self.crow_indices, self.col_indices, _kernel(self.values), shape)
            self._matrix = (key, matrix)
        return self._matrix[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = super().forward(x)  # (..., out)
        if self.nnz == 0:
            return low_rank
        return low_rank + self.sparse_product(x).to(low_rank.dtype)

    def sparse_product(self, x: torch.Tensor) -> torch.Tensor:
        """S @ x for x (..., in): (..., out), float32 or float64 (the CSR kernels' dtypes)."""
        return sparse_apply(self._sparse_matrix(), x)

    def csr(self) -> CSR:
        shape = (self.out_features, self.in_features)
        return CSR(self.crow_indices, self.col_indices, self.values.detach(), shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) matrix: factors plus the sparse residual."""
        return self.left @ self.right + self.csr().to_dense().to(self.left.dtype)

    def index_params(self) -> int:
        """Parameter-equivalents of the index buffers (values are counted as parameters)."""
        return index_params(self.nnz, self.out_features, self.in_features) if self.nnz else 0

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz}"


def factored_layer(
    left: torch.Tensor, right: torch.Tensor, sparse: CSR | None, bias: torch.Tensor | None
) -> LowRankLinear:
    """The module for factors: SparseLowRankLinear when there is a sparse residual."""
    if sparse is not None:
        return SparseLowRankLinear.from_parts(left, right, sparse, bias)
    return LowRankLinear.from_factors(left, right, bias)
