"""Which compute dtype the hardware multiplies fast: the `auto` of `calib_dtype` / `recover.dtype`.

bfloat16 halves the memory of activations and, where the CPU has bf16 instructions (AVX512_BF16
or AMX), runs matrix products ~2.5x faster than float32. Where it has none, torch emulates it: on
a 2-core AVX2 EPYC a bf16 (2048x576 @ 576x1536) product ran at 0.8 GFLOP/s against 50 in float32,
and the bf16 backward fell back to a reference GEMM (bench/results/hardware.md). So `auto` picks
bfloat16 only where it is native, decided from what the CPU reports (deterministic: no timing),
and the run's log says which and why.

The decision reads three things, each of which the AVX2 emulation of an AVX-512 machine changes:
- torch's kernel capability (`torch.backends.cpu.get_cpu_capability()`, which honours
  `ATEN_CPU_CAPABILITY`): bf16 kernels need the AVX512 family;
- the CPU's flags `avx512_bf16` / `amx_bf16` (torch's cpuinfo);
- oneDNN's ISA cap (`ONEDNN_MAX_CPU_ISA`): a cap below AVX512_CORE_BF16 removes its bf16 GEMMs.
CUDA: bfloat16 from compute capability 8.0 (Ampere) on, float32 before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from rankwise.core.errors import RecipeError
from rankwise.core.recipe import Recipe

DTYPE_NAMES = ("auto", "float32", "bfloat16")

# oneDNN ISA names at or above the first with native bf16 dot products
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512")


@dataclass(frozen=True)
class CpuFacts:
    """What the bf16 decision reads about a CPU (tests build these by hand)."""

    capability: str  # torch's kernel capability: "AVX512", "AVX2", "DEFAULT", "SVE256", ...
    avx512_bf16: bool
    amx_bf16: bool
    onednn_max_isa: str | None  # the ONEDNN_MAX_CPU_ISA cap, when set

    @classmethod
    def detect(cls) -> CpuFacts:
        flags = _cpu_flags()
        return cls(
            capability=torch.backends.cpu.get_cpu_capability(),
            avx512_bf16=bool(flags.get("avx512_bf16", False)),
            amx_bf16=bool(flags.get("amx_bf16", False)),
            onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
        )

    def describe(self) -> str:
        flags = [
            name
            for name, on in (("avx512_bf16", self.avx512_bf16), ("amx_bf16", self.amx_bf16))
            if on
        ]
        cap = f", ONEDNN_MAX_CPU_ISA={self.onednn_max_isa}" if self.onednn_max_isa else ""
        return f"CPU capability {self.capability}, bf16 flags: {', '.join(flags) or 'none'}{cap}"


def _cpu_flags() -> dict[str, object]:
    try:
        return dict(torch._C._cpu._get_cpu_capability())
    except (AttributeError, RuntimeError):  # older or non-x86 builds: no flags known
        return {}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_bf16_native(facts: CpuFacts) -> tuple[bool, str]:
    """Whether bf16 matrix products run natively on this CPU, and why (or why not)."""
    if not facts.capability.upper().startswith("AVX512"):
        return False, f"torch kernels at {facts.capability}, not AVX512"
    if not (facts.avx512_bf16 or facts.amx_bf16):
        return False, "no AVX512_BF16 or AMX instructions"
    isa = (facts.onednn_max_isa or "").upper()
    if isa and isa != "ALL" and isa not in _ONEDNN_BF16_ISAS:
        return False, f"oneDNN capped at {isa}"
    return True, "AVX512_BF16" + (" and AMX" if facts.amx_bf16 else "")


def cuda_bf16_native(major: int, minor: int) -> tuple[bool, str]:
    if (major, minor) >= (8, 0):
        return True, f"CUDA compute capability {major}.{minor} >= 8.0"
    return False, f"CUDA compute capability {major}.{minor} < 8.0"


def choose_dtype(
    requested: str,
    device: torch.device | str = "cpu",
    cpu: CpuFacts | None = None,
    cuda_capability: tuple[int, int] | None = None,
) -> DtypeChoice:
    """The compute dtype for `requested` ("auto" or an explicit name) on `device`."""
    if requested not in DTYPE_NAMES:
        raise RecipeError(f"unknown dtype {requested!r}: choose one of {', '.join(DTYPE_NAMES)}")
    if requested != "auto":
        return DtypeChoice(getattr(torch, requested), "asked for explicitly")
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = cuda_capability or torch.cuda.get_device_capability(device)
        native, why = cuda_bf16_native(major, minor)
    elif device.type == "cpu":
        facts = cpu or CpuFacts.detect()
        native, why = cpu_bf16_native(facts)
        why = f"{why} ({facts.describe()})"
    else:
        native, why = False, f"device {device.type}: float32 unless asked"
    dtype = torch.bfloat16 if native else torch.float32
    verdict = "native bf16" if native else "bf16 not native"
    return DtypeChoice(dtype, f"auto: {verdict}: {why}")


def resolve_device(spec: str) -> torch.device:
    """The execution device a recipe names: "auto" is the first CUDA device when one is
    present, else the CPU; "cuda" / "cuda:N" must exist (RecipeError otherwise)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise RecipeError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "meta"):
        raise RecipeError(f"unsupported device '{spec}': use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"device '{spec}' asked but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise RecipeError(f"device '{spec}' asked but torch sees {count} CUDA device(s)")
    return device


def compute_dtype(requested: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype `requested` resolves to on `device` (explicit names pass through)."""
    return choose_dtype(requested, device).dtype


def resolve_dtypes(recipe: Recipe, device: torch.device | str = "cpu") -> tuple[Recipe, str]:
    """The recipe with `auto` dtypes replaced by this machine's choice, and a log line saying
    which and why; the saved recipe.yaml then names the dtype the run really used."""
    calib = choose_dtype(recipe.calib_dtype, device)
    recover = choose_dtype(recipe.recover.dtype, device)
    changed = recipe.model_copy(
        update={
            "calib_dtype": calib.name,
            "recover": recipe.recover.model_copy(update={"dtype": recover.name}),
        }
    )
    line = f"compute dtype {calib.name}: {calib.reason}"
    if recipe.recover.steps and recover.name != calib.name:
        line += f"; recovery {recover.name}: {recover.reason}"
    return changed, line


def machine_line() -> str:
    """One line naming the machine a figure was measured on (every timing carries it)."""
    import platform

    facts = CpuFacts.detect()
    name = str(_cpu_flags().get("cpu_name") or platform.processor() or platform.machine())
    return (
        f"CPU {name}, torch {torch.__version__}, {facts.describe()}, "
        f"{torch.get_num_threads()} threads"
    )
