"""Input grams (sum of x x^T over calibration tokens) by forward hooks, float64 totals.

The hooks and the product live here; statistics.py runs the passes that use them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch
from torch import nn

from rankwise.core import parallel
from rankwise.core.errors import CalibrationError
from rankwise.methods.base import LayerStats
from rankwise.model.modules import linear_weight

# from this input width on, a gram is built from its blocks (narrower: one GEMM is as fast)
SPLIT_FROM = 512


def add_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """total (in, in) float64 += X^T X of a (tokens, in) matrix.

    bfloat16 inputs (the default calibration dtype) are multiplied in bfloat16: the GEMM
    accumulates in float32 and rounds each batch's product to bfloat16 once (2^-9 relative per
    entry; the batches' roundings average out in the float64 total). On SmolLM2's grams that
    changed the whitened truncation error by under 0.01% and halved the time of the float32
    product (the four grams of a block: ~1.9 s -> ~1 s on 128 x 512 tokens). Other dtypes are
    multiplied in float32, so float32 calibration stays exact.

    X^T X is symmetric: wide inputs (>= SPLIT_FROM features) are split in two column halves, and
    the two diagonal blocks and one off-diagonal block take 3/4 of the multiply-adds of the full
    product. torch's GEMM, not BLAS syrk: scipy's OpenBLAS threads and torch's OpenMP threads
    spin against each other between layers (measured 2x slower).
    """
    flat = x.detach()  # (tokens, in)
    if flat.dtype != torch.bfloat16:
        flat = flat.float()
    width = flat.shape[1]
    if width < SPLIT_FROM:
        total += (flat.T @ flat).double()
        return
    half = width // 2
    left, right = flat[:, :half], flat[:, half:]  # (tokens, half), (tokens, in - half)
    total[:half, :half] += (left.T @ left).double()
    total[half:, half:] += (right.T @ right).double()
    cross = (left.T @ right).double()  # (half, in - half)
    total[:half, half:] += cross
    total[half:, :half] += cross.T


class GramCollector:
    """Forward pre-hooks that add each target's input gram; shared inputs counted once.

    `root` is the module the `names` are relative to (one block, or a whole small model).
    Targets in `narrow` (out < in, for a method that can factorize them from their outputs) get
    the gram of their outputs instead, bias removed: Y^T Y = W X^T X W^T is all such a layer's
    factors need, and it is (out, out) where the input gram is (in, in). For SmolLM2's MLP down
    projection that is 576^2 multiply-adds per token instead of 1536^2, ~60% of the grams' time.
    A narrow target whose input a sibling already has a gram of shares that gram instead.
    """

    def __init__(self, root: nn.Module, names: list[str], narrow: set[str] | None = None) -> None:
        self.names = names
        self.narrow = narrow or set()
        self.owner: dict[str, str] = {}  # name -> the target whose statistics it shares
        self.grams: dict[str, torch.Tensor] = {}  # owner -> (in, in) float64 input gram
        self.output_grams: dict[str, torch.Tensor] = {}  # narrow owner -> (out, out) float64
        self.tokens: dict[str, int] = {}  # owner -> tokens seen
        # Recent inputs: q/k/v (gate/up) receive the same tensor object one after another.
        self._seen: deque[tuple[torch.Tensor, str]] = deque(maxlen=8)
        self._reduced = False
        self._handles = [
            root.get_submodule(name).register_forward_pre_hook(self._hook(name)) for name in names
        ] + [
            root.get_submodule(name).register_forward_hook(self._output_hook(name))
            for name in names
            if name in self.narrow
        ]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            for seen, owner in self._seen:
                if seen is x:  # same tensor as an earlier target: share its gram
                    self.owner.setdefault(name, owner)
                    return
            self.owner.setdefault(name, name)
            if name in self.narrow:
                return  # its forward hook adds the gram of its outputs
            self._seen.append((x, name))
            self._add(self.grams, name, x)

        return hook

    def _output_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.owner.get(name) != name:  # shares a sibling's input gram
                return
            bias = getattr(module, "bias", None)
            self._add(self.output_grams, name, output if bias is None else output - bias)

        return hook

    def _add(self, grams: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])  # (tokens, features)
        if name not in grams:
            width = flat.shape[1]
            grams[name] = torch.zeros(width, width, dtype=torch.float64, device=flat.device)
            self.tokens[name] = 0
        add_gram(grams[name], flat)
        self.tokens[name] += flat.shape[0]

    def stats(self) -> dict[str, LayerStats]:
        """Grams (one shared object per distinct input) and token counts per target; under
        torchrun, summed over every rank's windows (each rank then holds the same grams)."""
        missing = [n for n in self.names if n not in self.owner]
        if missing:
            raise CalibrationError(f"no input reached {missing[0]} during calibration")
        if not self._reduced:
            self._reduce()
        return {
            n: LayerStats(
                input_gram=self.grams.get(self.owner[n]),
                output_gram=self.output_grams.get(self.owner[n]),
                tokens=self.tokens[self.owner[n]],
            )
            for n in self.names
        }

    def _reduce(self) -> None:
        """Sum the grams and token counts over the ranks, in the same order on every rank."""
        self._reduced = True
        for name in self.names:
            if self.owner[name] != name:
                continue
            for grams in (self.grams, self.output_grams):
                if name in grams:
                    parallel.reduce_sum(grams[name])
            device = (self.grams.get(name, self.output_grams.get(name))).device
            self.tokens[name] = parallel.reduce_count(self.tokens[name], device)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


def is_narrow(module: nn.Module) -> bool:
    out_features, in_features = linear_weight(module).shape
    return out_features < in_features


def narrow_targets(root: nn.Module, names: list[str], output_grams: bool) -> set[str]:
    """The targets (relative to `root`) that gather output grams: none unless the method takes
    them (`output_grams`), else those narrower out than in."""
    return {n for n in names if output_grams and is_narrow(root.get_submodule(n))}
