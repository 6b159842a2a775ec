"""torchrun data parallelism: 2 processes (gloo, CPU) give the factors one process gives, up to
floating-point summation order; the helpers are no-ops in a world of one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_windows
from safetensors.torch import load_file

import rankwise
from rankwise.core import parallel
from rankwise.core.recipe import Recipe
from rankwise.model.accounting import LayerShape
from rankwise.pipeline.sharing import owners_by_cost

TESTS = Path(__file__).parent

WORKER = """
import sys
sys.path.insert(0, {tests!r})
import torch
from safetensors.torch import save_file
from conftest import make_model, make_windows
import rankwise
from rankwise.core import parallel
from rankwise.core.recipe import Recipe

world = parallel.start(torch.device("cpu"))
torch.set_num_threads(1)
result = rankwise.compress(make_model("llama"), Recipe(**{recipe!r}), windows=make_windows(8, 16))
if world.is_main:
    state = {{k: v.contiguous() for k, v in result.model.state_dict().items()}}
    save_file(state, {out!r}, metadata={{"ranks": repr(result.ranks)}})
parallel.stop()
"""

RECIPES = [
    {"calib_dtype": "float32", "ratio": 0.5},  # importance, sequential, staged
    {"calib_dtype": "float32", "ratio": 0.5, "sequential": False, "method": "sparse"},
    {"calib_dtype": "float32", "ratio": 0.5, "allocation": "uniform", "method": "fwsvd"},
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_give_the_factors_of_one(tmp_path: Path, recipe: dict) -> None:
    out = tmp_path / "two.safetensors"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), recipe=recipe, out=str(out)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*launch, "--nproc-per-node", "2", str(script)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = load_file(str(out))
    one = rankwise.compress(make_model("llama"), Recipe(**recipe), windows=make_windows(8, 16))
    state = one.model.state_dict()
    assert two.keys() == state.keys()  # the same layers factorized, at the same ranks
    for key, value in state.items():
        assert two[key].shape == value.shape, key
    ids = make_windows(2, 16, seed=3)
    with torch.no_grad():
        expected = one.model(ids).logits
    saved = rankwise.save(one, str(tmp_path / "one"))
    twin = rankwise.load(saved, merge_policy="never")
    twin.load_state_dict(two)  # the one-process modules holding the two-process tensors
    with torch.no_grad():
        assert torch.allclose(twin(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_world_of_one_changes_nothing() -> None:
    windows = make_windows(5, 4)
    assert parallel.world() == parallel.World(0, 1)
    assert torch.equal(parallel.shard(windows), windows)
    total = torch.ones(3)
    assert torch.equal(parallel.reduce_sum(total), torch.ones(3))
    assert parallel.reduce_count(7) == 7


def test_owners_are_balanced_by_cost() -> None:
    shapes = [LayerShape("big", 100, 100), LayerShape("a", 10, 10), LayerShape("b", 10, 10)]
    owners = owners_by_cost(shapes, 2)
    assert owners["big"] != owners["a"] and owners["a"] == owners["b"]
