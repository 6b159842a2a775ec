"""Low rank plus sparse: byte accounting, monotone refinement, round trips, and the reason it
exists (outliers that low rank cannot hold)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_windows, model_output
from safetensors import safe_open
from torch import nn

import rankwise
from rankwise.allocation.budget import allocate_importance
from rankwise.core.recipe import Recipe
from rankwise.methods import LayerStats, MethodOptions, get_method
from rankwise.methods.sparse import curve_ranks, scaled_spectrum, split_budget
from rankwise.model.accounting import LayerShape, count_parameters
from rankwise.model.csr import CSR, csr_params, index_dtype, index_params, max_nnz
from rankwise.model.layers import LowRankLinear, SparseLowRankLinear
from rankwise.storage.manifest import Manifest

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def inputs(tokens: int = 400, features: int = 48, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 3.0, features, dtype=torch.float64)
    return torch.randn(tokens, features, generator=gen, dtype=torch.float64) * scales


def outlier_weight(out_f: int = 64, in_f: int = 48, seed: int = 1) -> torch.Tensor:
    """Rank 6 plus noise plus 1% large single entries: what low rank cannot hold."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, 6, generator=gen) @ torch.randn(6, in_f, generator=gen)
    w += 0.05 * torch.randn(out_f, in_f, generator=gen)
    spots = torch.randperm(out_f * in_f, generator=gen)[: out_f * in_f // 100]
    w.view(-1)[spots] += 8.0 * torch.randn(len(spots), generator=gen)
    return w


def output_error(w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - approx).double() @ x.T).square().sum())


def factorize(name: str, w: torch.Tensor, x: torch.Tensor, rank: int, **options: object):
    stats = LayerStats(input_gram=x.T @ x, tokens=len(x))
    return get_method(name).factorize(w, stats, rank, MethodOptions(**options))


def layer_cost(factors) -> int:
    out_f, rank = factors.left.shape
    nnz = 0 if factors.sparse is None else factors.sparse.nnz
    return rank * (out_f + factors.right.shape[1]) + csr_params(nnz, out_f, factors.right.shape[1])


# --- byte accounting ---------------------------------------------------------------------------


def test_csr_cost_counts_values_and_indices() -> None:
    # 100 values (400 B) + 100 int16 columns (200 B) + 65 int32 row pointers (260 B) = 860 B
    assert csr_params(100, 64, 48) == 215
    assert index_params(100, 64, 48) == 115
    assert csr_params(0, 64, 48) == 0
    assert index_dtype(32767) == torch.int16 and index_dtype(32768) == torch.int32


@pytest.mark.parametrize("params", [0, 50, 66, 67, 500, 5000])
def test_max_nnz_is_the_largest_that_fits(params: int) -> None:
    nnz = max_nnz(params, 64, 48)
    assert csr_params(nnz, 64, 48) <= params
    assert nnz == 64 * 48 or csr_params(nnz + 1, 64, 48) > params


@pytest.mark.parametrize("rank", [2, 10, 20])
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.45])
def test_every_split_fits_the_rank_budget(rank: int, fraction: float) -> None:
    split = split_budget(rank, 64, 48, fraction)
    if split is not None:
        low, nnz = split
        assert low < rank and nnz > 0
        assert low * (64 + 48) + csr_params(nnz, 64, 48) <= rank * (64 + 48)


@pytest.mark.parametrize("rank", [3, 8, 16])
def test_factors_stay_within_the_budget_of_their_rank(rank: int) -> None:
    factors = factorize("sparse", outlier_weight(), inputs(), rank)
    assert layer_cost(factors) <= rank * (64 + 48)


def with_outliers(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.shape != (128, 64):
                flat = module.weight.view(-1)
                spots = torch.randperm(len(flat), generator=gen)[: len(flat) // 100]
                flat[spots] += 0.5 * torch.randn(len(spots), generator=gen)
    return model


def compress_tiny(method: str, ratio: float = 0.4, allocation: str = "uniform"):
    recipe = Recipe(method=method, ratio=ratio, calib_dtype="float32", allocation=allocation)
    model = with_outliers(make_model("llama"))
    return rankwise.compress(model, recipe, windows=make_windows())


def test_sparse_model_is_no_larger_than_the_low_rank_one(tmp_path: Path) -> None:
    sparse, whiten = compress_tiny("sparse"), compress_tiny("whiten")
    assert any(layer.nnz > 0 for layer in sparse.layers)
    assert sparse.targeted_after <= whiten.targeted_after
    assert sparse.model_params_after <= whiten.model_params_after
    for ours, theirs in zip(sparse.layers, whiten.layers, strict=True):
        # each layer within its rank's budget
        assert ours.count.kept_params <= theirs.count.kept_params
    sparse_dir = rankwise.save(sparse, str(tmp_path / "sparse"))
    whiten_dir = rankwise.save(whiten, str(tmp_path / "whiten"))
    size = {d: (Path(d) / "model.safetensors").stat().st_size for d in (sparse_dir, whiten_dir)}
    assert size[sparse_dir] <= size[whiten_dir]


def test_saved_accounting_matches_the_stored_tensors(tmp_path: Path) -> None:
    result = compress_tiny("sparse")
    out = rankwise.save(result, str(tmp_path / "model"))
    manifest = Manifest.read(out)
    block = manifest.to_block()
    kept = 0
    with safe_open(str(Path(out) / "model.safetensors"), "pt") as weights:
        for target in block["layers"]:
            name, nnz = target["name"], target["nnz"]
            stored = target["rank"] * (target["out"] + target["in"])
            if nnz:
                assert manifest.by_name()[name].count.kept_params > stored
                cols = weights.get_tensor(f"{name}.col_indices")
                crow = weights.get_tensor(f"{name}.crow_indices")
                values = weights.get_tensor(f"{name}.values")
                assert cols.dtype == torch.int16 and crow.dtype == torch.int32
                assert len(cols) == len(values) == nnz == int(crow[-1])
                raw = sum(t.numel() * t.element_size() for t in (cols, crow, values))
                stored += math.ceil(raw / 4)  # every byte counted, in fp32 parameter units
            assert manifest.by_name()[name].count.kept_params == stored
            kept += stored
    assert kept == result.targeted_after == block["targeted_params_after"]
    assert count_parameters(rankwise.load(out, merge_policy="never")) == result.model_params_after


# --- refinement --------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [8, 12])
def test_refinement_error_is_monotone_and_measured(rank: int) -> None:
    w, x = outlier_weight(), inputs()
    factors = factorize("sparse", w, x, rank, sparse_rounds=6)
    history = list(factors.refinement)
    assert len(history) >= 2  # at least one round kept on this matrix
    assert all(b <= a for a, b in zip(history, history[1:], strict=False)), history
    total = float((w.double() @ x.T).square().sum())
    measured = (output_error(w, factors.approximation(), x) / total) ** 0.5
    assert factors.rel_error == pytest.approx(measured, rel=1e-4)
    assert history[-1] == pytest.approx(measured, rel=1e-4)


@pytest.mark.parametrize("rank", [8, 12])
def test_sparse_beats_whiten_on_outliers_at_equal_budget(rank: int) -> None:
    w, x = outlier_weight(), inputs()
    sparse = factorize("sparse", w, x, rank)
    whiten = factorize("whiten", w, x, rank)
    assert sparse.sparse is not None
    assert layer_cost(sparse) <= layer_cost(whiten)
    ours = output_error(w, sparse.approximation(), x)
    assert ours < 0.7 * output_error(w, whiten.approximation(), x)


def test_no_sparse_part_when_it_does_not_pay() -> None:
    """A pure low-rank matrix: nonzeros buy nothing, so the method returns whiten's factors."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 5, generator=gen) @ torch.randn(5, 48, generator=gen)
    factors = factorize("sparse", w, inputs(), 5)
    assert factors.sparse is None and factors.left.shape == (64, 5)


# --- the allocation curve ---------------------------------------------------------------------


def tails(spectrum: torch.Tensor) -> torch.Tensor:
    energy = spectrum.double().square()
    return torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # (k+1,)


def curves(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparse, whiten) allocation curves of one layer."""
    stats = LayerStats(input_gram=x.T @ x, tokens=len(x))
    sparse = get_method("sparse").spectrum(w, stats, MethodOptions())
    return sparse, get_method("whiten").spectrum(w, stats, MethodOptions())


def test_allocation_curve_is_the_sparse_fits_error_where_measured() -> None:
    w, x = outlier_weight(), inputs()
    sparse, whiten = curves(w, x)
    assert tails(sparse)[0] == pytest.approx(float(tails(whiten)[0]), rel=1e-4)  # same total
    ranks = curve_ranks(*w.shape)
    for rank in ranks:
        fitted = factorize("sparse", w, x, rank, sparse_rounds=0)
        assert float(tails(sparse)[rank]) == pytest.approx(
            output_error(w, fitted.approximation(), x), rel=1e-3
        )
        assert tails(sparse)[rank] <= tails(whiten)[rank] * (1 + 1e-6)
    assert tails(sparse)[ranks[0]] < 0.7 * tails(whiten)[ranks[0]]  # outliers held by nonzeros


def test_allocation_curve_is_whitens_where_nonzeros_do_not_pay() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 5, generator=gen) @ torch.randn(5, 48, generator=gen)  # rank 5
    sparse, whiten = curves(w, inputs())
    total = float(tails(whiten)[0])
    torch.testing.assert_close(tails(sparse), tails(whiten), rtol=1e-3, atol=1e-8 * total)


def test_scaled_spectrum_interpolates_the_measured_ratios() -> None:
    spectrum = torch.linspace(3.0, 0.1, 40)
    scaled = tails(scaled_spectrum(spectrum, [10, 20], [0.5, 0.25]))
    plain = tails(spectrum)
    assert scaled[0] == pytest.approx(float(plain[0]))
    assert scaled[10] == pytest.approx(0.5 * float(plain[10]), rel=1e-6)
    assert scaled[15] == pytest.approx(0.5**1.5 * float(plain[15]), rel=1e-6)  # log-linear
    assert scaled[30] == pytest.approx(0.25 * float(plain[30]), rel=1e-6)  # held beyond
    assert bool((scaled[:-1] >= scaled[1:]).all())


def test_importance_allocation_moves_rank_off_a_layer_nonzeros_can_hold() -> None:
    """Two layers with the same spectrum under whiten; one holds its error in a few entries.
    Under sparse's curve the allocator gives that one less rank."""
    x = inputs()
    spiky = outlier_weight()
    whiten_spiky = curves(spiky, x)[1]
    gen = torch.Generator().manual_seed(3)
    u, _, vh = torch.linalg.svd(torch.randn(64, 48, generator=gen, dtype=torch.float64))
    stats = LayerStats(input_gram=x.T @ x)
    eigvecs, roots = get_method("whiten")._basis(stats, MethodOptions(eig_floor=1e-6))
    # a matrix with spiky's whitened spectrum but random singular vectors (no outliers)
    white = (u[:, :48] * whiten_spiky.double()) @ vh
    smooth = ((white / roots) @ eigvecs.T).float()
    shapes = [LayerShape("spiky", 64, 48), LayerShape("smooth", 64, 48)]
    ranks = {}
    for method in ("whiten", "sparse"):
        spectra = {
            "spiky": get_method(method).spectrum(spiky, stats, MethodOptions()),
            "smooth": get_method(method).spectrum(smooth, stats, MethodOptions()),
        }
        gains = {name: s.double().square() for name, s in spectra.items()}
        ranks[method] = allocate_importance(shapes, gains, 0.6)
    assert abs(ranks["whiten"]["spiky"] - ranks["whiten"]["smooth"]) <= 1
    assert ranks["sparse"]["spiky"] < ranks["sparse"]["smooth"] - 1


# --- the layer and round trips -----------------------------------------------------------------


def sparse_layer(with_bias: bool = True) -> SparseLowRankLinear:
    w, x = outlier_weight(), inputs()
    factors = factorize("sparse", w, x, 8)
    bias = torch.randn(64) if with_bias else None
    return SparseLowRankLinear.from_parts(factors.left, factors.right, factors.sparse, bias)


@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_merge_and_weight_agree(with_bias: bool) -> None:
    layer = sparse_layer(with_bias)
    x = torch.randn(3, 5, 48)  # (batch, seq, in)
    expected = x @ layer.weight.T + (layer.bias if with_bias else 0.0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-4)
    assert layer.col_indices.dtype == torch.int16  # stored compact
    assert isinstance(layer, LowRankLinear)


def test_a_bfloat16_copy_runs_as_sequential_calibration_makes_it() -> None:
    """Sequential calibration runs compressed blocks in bfloat16; CPU CSR kernels have no
    bfloat16, so the sparse term is applied in float32 and returned in the input's dtype."""
    layer = sparse_layer()
    x = torch.randn(2, 5, 48)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    out = half(x.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = layer(x)
    assert (out.float() - expected).norm() / expected.norm() < 0.02  # bfloat16 rounding


@pytest.mark.parametrize("sequential", [True, False])
def test_sparse_compresses_with_bfloat16_calibration(sequential: bool) -> None:
    recipe = Recipe(
        method="sparse",
        ratio=0.4,
        calib_dtype="bfloat16",
        sequential=sequential,
        allocation="uniform",
    )
    result = rankwise.compress(with_outliers(make_model("llama")), recipe, windows=make_windows())
    assert any(layer.nnz > 0 for layer in result.layers)
    assert 0.4 <= result.targeted_ratio


def test_loading_a_state_dict_refreshes_the_cached_matrix() -> None:
    source, target = sparse_layer(), sparse_layer()
    with torch.no_grad():
        source.values.mul_(2.0)
        source.col_indices.copy_(source.col_indices.flip(0))  # a different (valid) pattern
    x = torch.randn(4, 48)
    target(x)  # builds the cache
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x))


def test_csr_round_trip_through_dense() -> None:
    dense = torch.zeros(5, 7)
    dense[0, 3], dense[2, 0], dense[2, 6], dense[4, 1] = 1.0, -2.0, 3.0, 4.0
    rows, cols = dense.nonzero(as_tuple=True)
    csr = CSR.from_entries(rows.flip(0), cols.flip(0), dense[rows, cols].flip(0), (5, 7))
    assert csr.crow_indices.tolist() == [0, 1, 1, 3, 3, 4]
    torch.testing.assert_close(csr.to_dense(), dense)


@pytest.mark.parametrize("allocation", ["uniform", "importance"])
def test_compress_save_load_merge_round_trip(allocation: str, tmp_path: Path) -> None:
    result = compress_tiny("sparse", ratio=0.3, allocation=allocation)
    model = result.model
    expected = model_output(model, IDS)
    out = rankwise.save(result, str(tmp_path / "model"))
    loaded = rankwise.load(out, merge_policy="never")
    torch.testing.assert_close(model_output(loaded, IDS), expected, rtol=0, atol=1e-5)
    sparse_names = [n for n, m in loaded.named_modules() if isinstance(m, SparseLowRankLinear)]
    for name in sparse_names:
        parent_name, _, child = name.rpartition(".")
        parent = loaded.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).merge())
    torch.testing.assert_close(model_output(loaded, IDS), expected, rtol=1e-4, atol=1e-4)
