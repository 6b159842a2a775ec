"""The auto compute dtype: bfloat16 only where the hardware multiplies it natively."""

from __future__ import annotations

import pytest
import torch

from rankwise.core.errors import RecipeError
from rankwise.core.hardware import CpuFacts, choose_dtype, resolve_dtypes
from rankwise.core.recipe import Recipe

SAPPHIRE_RAPIDS = CpuFacts("AVX512", avx512_bf16=True, amx_bf16=True, onednn_max_isa=None)
ICE_LAKE = CpuFacts("AVX512", avx512_bf16=False, amx_bf16=False, onednn_max_isa=None)
EPYC_ZEN2 = CpuFacts("AVX2", avx512_bf16=False, amx_bf16=False, onednn_max_isa=None)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (SAPPHIRE_RAPIDS, torch.bfloat16),
        (CpuFacts("AVX512", True, False, None), torch.bfloat16),  # Zen 4 / Cooper Lake
        (ICE_LAKE, torch.float32),  # AVX-512 without its bf16 instructions
        (EPYC_ZEN2, torch.float32),
        (CpuFacts("DEFAULT", False, False, None), torch.float32),
        (CpuFacts("SVE256", False, False, None), torch.float32),  # ARM
        # the AVX2 emulation of an AVX-512 BF16 machine (ATEN_CPU_CAPABILITY=avx2)
        (CpuFacts("AVX2", True, True, None), torch.float32),
        # oneDNN capped below its bf16 ISA (ONEDNN_MAX_CPU_ISA=AVX2)
        (CpuFacts("AVX512", True, False, "AVX2"), torch.float32),
        (CpuFacts("AVX512", True, False, "AVX512_CORE_AMX"), torch.bfloat16),
        (CpuFacts("AVX512", True, False, "ALL"), torch.bfloat16),
    ],
)
def test_auto_picks_bf16_only_where_the_cpu_has_it(facts: CpuFacts, expected: torch.dtype) -> None:
    choice = choose_dtype("auto", "cpu", cpu=facts)
    assert choice.dtype == expected
    assert choice.reason.startswith("auto: ") and facts.capability in choice.reason


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float32)],
)
def test_auto_on_cuda_follows_the_compute_capability(
    capability: tuple[int, int], expected: torch.dtype
) -> None:
    choice = choose_dtype("auto", "cuda", cuda_capability=capability)
    assert choice.dtype == expected
    assert f"{capability[0]}.{capability[1]}" in choice.reason


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_explicit_values_are_kept_on_any_cpu(name: str) -> None:
    for facts in (SAPPHIRE_RAPIDS, EPYC_ZEN2):
        assert choose_dtype(name, "cpu", cpu=facts).dtype == getattr(torch, name)


def test_an_unknown_dtype_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="float16"):
        choose_dtype("float16")


def test_the_resolved_recipe_names_the_dtype_this_machine_uses() -> None:
    resolved, line = resolve_dtypes(Recipe())
    assert Recipe().calib_dtype == "auto" and Recipe().recover.dtype == "auto"
    expected = choose_dtype("auto").name
    assert resolved.calib_dtype == expected and resolved.recover.dtype == expected
    assert line.startswith(f"compute dtype {expected}: auto: ")


def test_the_detected_facts_follow_torch() -> None:
    facts = CpuFacts.detect()
    assert facts.capability == torch.backends.cpu.get_cpu_capability()
