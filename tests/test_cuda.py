"""The device-agnostic paths on a GPU: compression on `cuda` gives the CPU's model (up to the
GPU's kernels' rounding), statistics and factors come back to the model's home, recovery and
perplexity run there. Skipped where torch sees no CUDA device; `--device cuda` without one is
a clear error everywhere."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model, make_windows

import rankwise
from rankwise.core.errors import RecipeError
from rankwise.core.hardware import resolve_device
from rankwise.core.recipe import Recipe
from rankwise.evaluation.perplexity import perplexity

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused_there() -> None:
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
        return
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RecipeError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(RecipeError, match="unknown device"):
        resolve_device("tpu-7")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", ["whiten", "sparse", "fwsvd"])
@pytest.mark.parametrize("sequential", [True, False])
def test_compressing_on_cuda_gives_the_cpu_model(method: str, sequential: bool) -> None:
    recipe = {"calib_dtype": "float32", "ratio": 0.5, "method": method, "sequential": sequential}
    model, windows = make_model("llama"), make_windows(8, 16)
    on_cpu = rankwise.compress(
        copy.deepcopy(model), Recipe(**recipe, device="cpu"), windows=windows
    )
    on_gpu = rankwise.compress(
        copy.deepcopy(model), Recipe(**recipe, device="cuda"), windows=windows
    )
    assert on_gpu.ranks == on_cpu.ranks
    assert all(p.device.type == "cpu" for p in on_gpu.model.parameters())  # back home
    ids = make_windows(2, 16, seed=3)
    with torch.no_grad():
        expected, got = on_cpu.model(ids).logits, on_gpu.model(ids).logits
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
@needs_cuda
def test_perplexity_and_recovery_run_on_cuda() -> None:
    model, windows = make_model("llama"), make_windows(8, 16)
    result = rankwise.compress(model, Recipe(calib_dtype="float32", ratio=0.5), windows=windows)
    cpu_ppl = perplexity(result.model, windows).perplexity
    gpu_ppl = perplexity(copy.deepcopy(result.model).cuda(), windows).perplexity
    assert gpu_ppl == pytest.approx(cpu_ppl, rel=1e-3)
    from rankwise.core.recipe import RecoverConfig
    from rankwise.recovery.distill import recover

    config = RecoverConfig(steps=3, dtype="float32")
    log = recover(result.model, make_model("llama"), windows, config, device=torch.device("cuda"))
    assert len(log.losses) == 3
    assert all(p.device.type == "cpu" for p in result.model.parameters())
