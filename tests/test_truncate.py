"""Truncating factorized (and recovered) models further."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import clone, make_model, make_windows, model_output

import rankwise
from rankwise.cli.recover import run_truncate
from rankwise.core.errors import RatioError
from rankwise.core.recipe import Recipe, RecoverConfig
from rankwise.model.layers import LowRankLinear
from rankwise.recovery.truncate import product_svd, truncate_factors


def test_product_svd_equals_the_svd_of_the_product() -> None:
    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(30, 6, generator=gen), torch.randn(6, 20, generator=gen)
    u, s, vh = product_svd(left, right)
    assert torch.allclose((u * s) @ vh, (left @ right).double(), atol=1e-10)
    assert torch.allclose(s, torch.linalg.svdvals((left @ right).double())[:6], atol=1e-10)


def test_truncation_error_grows_as_rank_shrinks() -> None:
    gen = torch.Generator().manual_seed(1)
    left, right = torch.randn(30, 8, generator=gen), torch.randn(8, 20, generator=gen)
    errors = [truncate_factors(left, right, rank)[2] for rank in (8, 6, 4, 2)]
    assert errors[0] == pytest.approx(0.0, abs=1e-6)
    assert errors == sorted(errors)
    new_left, new_right, _ = truncate_factors(left, right, 8)
    assert torch.allclose(new_left @ new_right, left @ right, atol=1e-4)


def test_recovered_model_truncates_to_the_new_ratio(tmp_path: Path) -> None:
    teacher = make_model("llama")
    student = clone(teacher)
    result = rankwise.compress(
        student, Recipe(method="svd", ratio=0.3, allocation="uniform")
    )
    config = RecoverConfig(steps=3, lr=1e-3, batch_size=2, dtype="float32")
    rankwise.recover(student, teacher, make_windows(count=4, seq_len=16), config)
    rankwise.save(result, str(tmp_path / "rec"))

    info = run_truncate(tmp_path / "rec", tmp_path / "cut", 0.6)
    assert 0.6 <= info["targeted_ratio"] < 0.65
    cut = rankwise.load(tmp_path / "cut", merge_policy="never")
    ranks = {n: m.rank for n, m in cut.named_modules() if isinstance(m, LowRankLinear)}
    before = {n: m.rank for n, m in student.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks.keys() == before.keys() and all(ranks[n] < before[n] for n in ranks)
    block = json.loads((tmp_path / "cut" / "config.json").read_text())["rankwise"]
    assert block["ratio"] == 0.6 and block["truncated_from"] == pytest.approx(0.3, abs=0.02)
    ids = make_windows(count=2, seq_len=16, seed=5)
    assert torch.isfinite(model_output(cut, ids)).all()


def test_truncating_to_a_lower_ratio_is_refused(tmp_path: Path) -> None:
    model = make_model("llama")
    rankwise.save(
        rankwise.compress(model, Recipe(method="svd", ratio=0.5)), str(tmp_path / "a")
    )
    with pytest.raises(RatioError, match="no more than"):
        run_truncate(tmp_path / "a", tmp_path / "b", 0.3)
    assert not (tmp_path / "b").exists()
