"""Compression checkpoints: a run killed after any block and resumed gives the model an
uninterrupted run gives, bit for bit; a checkpoint of another run is refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_windows

import rankwise
from rankwise.core.errors import RankwiseError
from rankwise.core.recipe import Recipe
from rankwise.pipeline.checkpoint import CompressCheckpoint


class Killed(Exception):
    """Stands for the process dying right after a block's checkpoint was committed."""


def kill_after(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    real = CompressCheckpoint.save_block

    def save_then_die(self, index, *args, **kwargs):  # type: ignore[no-untyped-def]
        real(self, index, *args, **kwargs)
        if index == block:
            raise Killed

    monkeypatch.setattr(CompressCheckpoint, "save_block", save_then_die)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "recipe",
    [
        {"allocation": "importance"},
        {"allocation": "uniform", "staged": False},
        {"allocation": "importance", "importance_rounds": 2, "importance_measure": 1},
        {"allocation": "importance", "method": "sparse"},
    ],
)
@pytest.mark.parametrize("killed_after", [0, 1])
def test_a_killed_run_resumes_to_the_uninterrupted_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recipe: dict, killed_after: int
) -> None:
    chosen = Recipe(calib_dtype="float32", ratio=0.5, **recipe)
    model, windows = make_model("llama"), make_windows(8, 16)
    whole = rankwise.compress(copy.deepcopy(model), chosen, windows=windows)

    where = CompressCheckpoint(tmp_path / "ckpt")
    with monkeypatch.context() as patch:
        kill_after(patch, killed_after)
        with pytest.raises(Killed):
            rankwise.compress(copy.deepcopy(model), chosen, windows=windows, checkpoint=where)
    resumed = rankwise.compress(copy.deepcopy(model), chosen, windows=windows, checkpoint=where)

    assert resumed.ranks == whole.ranks
    expected, got = state(whole.model), state(resumed.model)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [e.model_dump() for e in resumed.layers] == [e.model_dump() for e in whole.layers]


def test_a_checkpoint_of_another_run_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, windows = make_model("llama"), make_windows(8, 16)
    where = CompressCheckpoint(tmp_path / "ckpt")
    with monkeypatch.context() as patch:
        kill_after(patch, 0)
        with pytest.raises(Killed):
            rankwise.compress(
                copy.deepcopy(model), Recipe(calib_dtype="float32", ratio=0.5),
                windows=windows, checkpoint=where,
            )  # fmt: skip
    with pytest.raises(RankwiseError, match="different run"):
        rankwise.compress(
            copy.deepcopy(model), Recipe(calib_dtype="float32", ratio=0.3),
            windows=windows, checkpoint=where,
        )  # fmt: skip
