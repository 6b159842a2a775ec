"""Truncating factorized (and recovered) models further."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import clone, make_model, make_windows, model_output

import rankwise
from rankwise.cli.recover import run_truncate
from rankwise.core.errors import RatioError
from rankwise.core.recipe import Recipe, RecoverConfig
from rankwise.model.accounting import count_parameters, targeted_totals
from rankwise.model.layers import LowRankLinear, SparseLowRankLinear
from rankwise.recovery.truncate import product_svd, truncate_factors
from rankwise.storage.manifest import Manifest


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
    result = rankwise.compress(student, Recipe(method="svd", ratio=0.3, allocation="uniform"))
    config = RecoverConfig(steps=3, lr=1e-3, batch_size=2, dtype="float32")
    rankwise.recover(student, teacher, make_windows(count=4, seq_len=16), config)
    rankwise.save(result, str(tmp_path / "rec"))

    info = run_truncate(tmp_path / "rec", tmp_path / "cut", 0.6)
    assert 0.6 <= info["targeted_ratio"] < 0.65
    cut = rankwise.load(tmp_path / "cut", merge_policy="never")
    ranks = {n: m.rank for n, m in cut.named_modules() if isinstance(m, LowRankLinear)}
    before = {n: m.rank for n, m in student.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks.keys() == before.keys() and all(ranks[n] < before[n] for n in ranks)
    block = Manifest.read(tmp_path / "cut").to_block()
    assert block["ratio"] == 0.6 and block["truncated_from"] == pytest.approx(0.3, abs=0.02)
    ids = make_windows(count=2, seq_len=16, seed=5)
    assert torch.isfinite(model_output(cut, ids)).all()


def test_truncating_to_a_lower_ratio_is_refused(tmp_path: Path) -> None:
    model = make_model("llama")
    rankwise.save(rankwise.compress(model, Recipe(method="svd", ratio=0.5)), str(tmp_path / "a"))
    with pytest.raises(RatioError, match="no more than"):
        run_truncate(tmp_path / "a", tmp_path / "b", 0.3)
    assert not (tmp_path / "b").exists()


def sparse_saved(tmp_path: Path) -> Path:
    recipe = Recipe(method="sparse", ratio=0.3, allocation="uniform", calib_dtype="float32")
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows())
    return Path(rankwise.save(result, str(tmp_path / "sparse")))


def test_truncating_a_sparse_model_keeps_its_residual_and_counts_it(tmp_path: Path) -> None:
    source = sparse_saved(tmp_path)
    before = {
        n: m for n, m in rankwise.load(source, merge_policy="never").named_modules()
        if isinstance(m, SparseLowRankLinear)
    }  # fmt: skip
    assert before and any(m.nnz for m in before.values())
    info = run_truncate(source, tmp_path / "cut", 0.5)
    cut = rankwise.load(tmp_path / "cut", merge_policy="never")
    manifest = Manifest.read(tmp_path / "cut")
    for name, old in before.items():
        new = cut.get_submodule(name)
        assert isinstance(new, SparseLowRankLinear) and new.nnz == old.nnz
        assert new.rank < old.rank
        torch.testing.assert_close(new.csr().to_dense(), old.csr().to_dense())
        assert manifest.by_name()[name].nnz == old.nnz
    # the saved accounting is the accounting of what was saved
    dense, kept = targeted_totals(entry.count for entry in manifest.layers)
    assert kept == info["targeted_params_after"] and 0.5 <= 1 - kept / dense < 0.55
    assert count_parameters(cut) == manifest.model_params_after
