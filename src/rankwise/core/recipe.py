"""The typed recipe: the CLI's flags are made from its fields (each `description` is the flag's
help); the recipe used is saved with the model.

A recipe is the whole description of a compression run, so a saved model can be reproduced from
its `recipe.yaml` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rankwise.core.errors import RatioError, RecipeError


def check_ratio(value: float, what: str = "ratio") -> float:
    """A ratio is a fraction of parameters removed: strictly between 0 and 1."""
    if not 0.0 < value < 1.0:
        raise RatioError(f"{what} must be in the open interval (0, 1), got {value}")
    return value


class LayerOverride(BaseModel):
    """Per-layer setting, selected by a regex matched against the module name."""

    model_config = ConfigDict(extra="forbid")
    pattern: str
    ratio: float | None = None  # this layer's own fraction removed (uniform allocation)
    min_keep: float | None = Field(default=None, ge=0.0, le=1.0)  # kept fraction lower bound
    max_keep: float | None = Field(default=None, ge=0.0, le=1.0)  # kept fraction upper bound
    dense: bool = False  # never factorize matching layers

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, value: float | None) -> float | None:
        # checked here, not first at allocation (after a calibration pass that may take minutes)
        return None if value is None else check_ratio(value, "override ratio")


class RecoverConfig(BaseModel):
    """Recovery by distillation (recover.py): how long, how fast, on which text."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(default=0, ge=0, description="distillation steps (0: no recovery)")
    # measured: bench/results/recover.md
    lr: float = Field(default=2e-4, gt=0.0, description="peak learning rate of recovery")
    batch_size: int = Field(default=2, ge=1)  # windows per step
    seq_len: int = Field(default=192, ge=2)  # 200 steps fit in 10 min (bench/results/recover.md)
    windows: int = Field(default=512, ge=1)  # training windows, cut from `calib`'s calib split
    calib: str | None = None  # None: the compression's calibration text
    warmup: float = Field(default=0.1, ge=0.0, lt=1.0)  # fraction of steps warming up linearly
    min_lr: float = Field(default=0.1, ge=0.0, le=1.0)  # cosine floor, as a fraction of lr
    clip: float = Field(default=1.0, gt=0.0)  # gradient-norm clip
    weight_decay: float = Field(default=0.0, ge=0.0)
    temperature: float = Field(default=1.0, gt=0.0)
    hidden_weight: float = Field(default=0.0, ge=0.0)  # + last-hidden-state matching
    # autocast of forward and backward; "auto" as calib_dtype (hardware.py)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    checkpoint_every: int = Field(default=50, ge=1)
    # > 0: run the teacher once over the training windows first and keep its top-k
    # log-probabilities on disk (beside the checkpoints), so teacher and student never share
    # memory; 0: the teacher runs beside the student at every step
    teacher_topk: int = Field(default=0, ge=0)
    seed: int = 0


class Recipe(BaseModel):
    """What to compress, how, and on which text."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="default", description="'default', a HF directory or a .gguf file")
    method: str = Field(default="whiten", description="svd | fwsvd | whiten | sparse | modular")
    ratio: float = Field(default=0.2, description="fraction of the targeted parameters removed")
    # importance: measured better than uniform at every ratio (bench/results/allocation.md)
    allocation: Literal["uniform", "importance"] = Field(
        default="importance", description="how the ratio is shared between layers"
    )
    targets: list[str] | None = Field(
        default=None, description="regexes of the linears to compress (default: built-in list)"
    )
    ignore: list[str] = Field(default_factory=list, description="regexes of linears to leave alone")
    overrides: list[LayerOverride] = Field(
        default_factory=list, description="per-layer settings selected by regex"
    )
    # calibration
    calib: str = Field(default="bbc", description="bbc | wiki | FILE.txt | FILE.jsonl")
    samples: int = Field(default=128, ge=1, description="calibration windows")
    seq_len: int = Field(default=512, ge=2, description="tokens per window")
    # "auto": bfloat16 where the hardware multiplies it natively, else float32 (hardware.py)
    calib_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="calibration dtype (auto: bfloat16 only where native)"
    )
    # Block k calibrated on the model whose blocks before k are compressed (measured better at
    # every ratio: bench/results/sequential.md). A statistics file (`stats`) holds the dense
    # model's statistics, reusable across ratios, so giving one implies a single pass.
    sequential: bool = Field(
        default=True, description="calibrate block k on the model with blocks before it compressed"
    )
    # Sequential inside each block too, group by group (staged.py): the attention runs once per
    # block instead of twice (SmolLM2's default run 2:19 -> 1:41), and the models are as good or
    # better on SmolLM2 and Gemma 3 270M (bench/results/sequential.md). False gathers each
    # block dense, then recomputes it.
    staged: bool = Field(default=True, description="sequential group by group inside blocks")
    stats: str | None = Field(
        default=None, description="statistics file (safetensors) to reuse; written if missing"
    )
    # importance allocation: windows (the first of the calibration set) for the output Fisher
    # and, with sequential calibration, for the dense spectra. 16 measured as good as 32 on the
    # default path at 0.4 (98.13 / 271.15 against 98.09 / 275.55) in half the pass's time.
    importance_samples: int = Field(default=16, ge=1, description="windows for the importance pass")
    # how a layer's output error becomes estimated loss (docs/allocation in README):
    # "fisher" weights it by the output Fisher, "output_error" takes it raw, "relative" divides
    # it by the layer's total (every layer's relative error counts the same)
    importance_estimator: Literal["fisher", "output_error", "relative"] = Field(
        default="fisher", description="how a layer's output error becomes estimated loss"
    )
    # importance rounds: 1 weighs layers by the dense model's output Fisher; 2 measures it again
    # on the model round 1 compressed and compresses again (plan.py). A third round was measured
    # worse than the second (the allocation oscillates: bench/results/allocation.md), so at most 2.
    importance_rounds: int = Field(
        default=1,
        ge=1,
        le=2,
        description="1 | 2 (2: reallocate by the Fisher of the round-1 model)",
    )
    # measured importance (sensitivity.py): passes that truncate each target alone to its planned
    # rank, measure the loss increase on `measure_samples` windows (those after the importance
    # windows) and rescale the layer's curve before allocating again; 0 = the estimate alone
    importance_measure: int = Field(
        default=0,
        ge=0,
        le=3,
        description="0-3 passes measuring each layer's loss at its planned rank",
    )
    measure_samples: int = Field(
        default=4, ge=1, description="windows each measured-importance pass scores"
    )
    recover: RecoverConfig = Field(
        default_factory=RecoverConfig, description="recovery by distillation after compressing"
    )
    # decided when the model is saved and stored with it: keep a layer factorized only where
    # that is faster on the saving machine ("auto", measured), always ("never" merge), or run
    # everything dense ("always"); every rankwise.load of the directory applies the decision
    merge_policy: Literal["auto", "never", "always"] = Field(
        default="auto", description="merge factors to dense at save (auto: where faster)"
    )
    # modular only (docs/modular.md): one MLP width everywhere, written to the config's
    # intermediate_size, attention dense: a directory plain transformers loads
    portable: bool = Field(
        default=False, description="modular: one MLP width, attention dense, plain HF checkpoint"
    )
    # where every phase runs (hardware.resolve_device); the model itself stays on the CPU and
    # each block is copied to the device for its turn
    device: str = Field(default="auto", description="auto (CUDA when present) | cpu | cuda:N")
    # the saved weights' dtype; "auto" keeps the source's (a bf16 directory gives bf16, a GGUF
    # gives float32); recipe.yaml records the resolved one
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="saved weights' dtype (auto: the source's)"
    )
    # method options
    eig_floor: float = Field(
        default=1e-6,
        gt=0.0,
        lt=1.0,
        description="whiten: eigenvalue floor, relative to the largest",
    )
    seed: int = Field(default=0, description="random seed of the run")

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, value: float) -> float:
        return check_ratio(value)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
            return cls.model_validate(data)
        except RatioError:
            raise
        except (yaml.YAMLError, ValidationError) as err:
            first = str(err).splitlines()
            raise RecipeError(f"invalid recipe {path}: {' '.join(first[:3])}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def merged(self, **changes: object) -> Recipe:
        """A copy with the non-None `changes` applied and validated (CLI flags over a file)."""
        data = self.model_dump()
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                value = {**data[key], **{k: v for k, v in value.items() if v is not None}}
            if value is not None:
                data[key] = value
        try:
            return type(self).model_validate(data)
        except RatioError:
            raise
        except ValidationError as err:
            raise RecipeError(" ".join(str(err).splitlines()[:3])) from None
