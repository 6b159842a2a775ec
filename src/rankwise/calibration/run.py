"""One compression's calibration context, carried as a value.

Every pass over calibration text (importance spectra, output Fisher, measured sensitivity,
the statistics the factors are fitted to) needs the same things: the model, its targets, the
method, the recipe, the windows, where progress goes. `CalibrationRun` carries them together so
each pass takes the run and what is particular to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.core import parallel
from rankwise.core.errors import CalibrationError
from rankwise.core.hardware import compute_dtype, resolve_device
from rankwise.core.progress import Reporter, Timer
from rankwise.core.recipe import Recipe
from rankwise.data.corpora import calibration_windows
from rankwise.methods import Method, MethodOptions
from rankwise.model.accounting import LayerShape


@dataclass
class CalibrationRun:
    """What every calibration pass of one compression needs, carried together."""

    model: nn.Module
    names: list[str]  # the targets, in model order
    shapes: dict[str, LayerShape]
    method: Method
    recipe: Recipe  # dtypes already resolved (no "auto")
    tokenizer: object | None
    windows: torch.Tensor | None  # (count, seq_len) token ids; cut from the recipe's text if None
    reporter: Reporter
    timer: Timer
    # one per run: its GramCache shares a gram's decomposition between the layers reading it
    options: MethodOptions = field(init=False)
    device: torch.device = field(init=False)  # where every pass and factorization runs

    def __post_init__(self) -> None:
        self.options = MethodOptions(eig_floor=self.recipe.eig_floor)
        self.device = resolve_device(self.recipe.device)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of calibration forwards (statistics stay float64)."""
        return compute_dtype(self.recipe.calib_dtype, self.device)

    def all_windows(self) -> torch.Tensor:
        """Every calibration window, cut from the text the first time they are needed."""
        self.windows = resolve_windows(self.recipe, self.tokenizer, self.windows, self.reporter)
        return self.windows

    def token_windows(self) -> torch.Tensor:
        """This rank's calibration windows (all of them without torchrun)."""
        return sharded(self.all_windows())

    def importance_windows(self) -> torch.Tensor:
        """This rank's share of the first `importance_samples` calibration windows."""
        return sharded(self.all_windows()[: self.recipe.importance_samples])

    def measure_windows(self) -> torch.Tensor:
        """`measure_samples` windows after the importance ones (the last ones if none are);
        not sharded: every rank scores the same windows, so it measures the same loss."""
        windows, recipe = self.all_windows(), self.recipe
        start = recipe.importance_samples
        after = windows[start : start + recipe.measure_samples]
        return after if len(after) else windows[-recipe.measure_samples :]


def sharded(windows: torch.Tensor) -> torch.Tensor:
    """This rank's disjoint share of `windows`; every rank needs at least one."""
    size = parallel.world().size
    if len(windows) < size:
        raise CalibrationError(
            f"{len(windows)} calibration windows cannot be shared by {size} processes"
        )
    return parallel.shard(windows)


def resolve_windows(
    recipe: Recipe, tokenizer: object | None, windows: torch.Tensor | None, reporter: Reporter
) -> torch.Tensor:
    """`windows` if given, else the recipe's calibration text cut into windows."""
    if windows is not None:
        return windows
    if tokenizer is None:
        raise CalibrationError("calibration needs a tokenizer or token windows")
    windows = calibration_windows(tokenizer, recipe.calib, recipe.samples, recipe.seq_len)
    if len(windows) < recipe.samples:
        reporter.log(
            f"warning: calibration text gives {len(windows)} windows of {recipe.seq_len} tokens "
            f"(asked {recipe.samples})"
        )
    return windows
