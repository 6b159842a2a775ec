"""Every factorization method in the registry, on plain tensors (no models).

Parametrized over REGISTRY's keys: a newly registered method gets the common matrix for free.
Each method's error is measured in its own metric, chosen from what it `needs`:
Fisher-weighted row error (fisher), output error on the calibration inputs (input_gram),
plain weight error (nothing).
"""

from __future__ import annotations

import pytest
import torch

from rankwise.core.errors import CalibrationError, RankwiseError
from rankwise.methods import REGISTRY, LayerStats, MethodOptions, get_method
from rankwise.methods.base import split_singular
from rankwise.methods.whiten import whitening_basis
from rankwise.pipeline.layer_loop import relative_error

METHODS = sorted(REGISTRY)
OUT, IN, TOKENS = 24, 32, 200
OPTIONS = MethodOptions()


def inputs(tokens: int = TOKENS, seed: int = 0, dead: int = 0) -> torch.Tensor:
    """(tokens, IN) float64 inputs with correlated channels of different scales."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(tokens, IN, generator=gen, dtype=torch.float64)
    scales = torch.linspace(0.3, 3.0, IN, dtype=torch.float64)
    mixing = torch.eye(IN, dtype=torch.float64) + 0.3 * torch.randn(
        IN, IN, generator=gen, dtype=torch.float64
    )
    x = (raw * scales) @ mixing
    if dead:
        x[:, :dead] = 0.0  # channels that never fire
    return x


def weight(seed: int = 1, out_f: int = OUT, in_f: int = IN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=gen)


def fisher_for(seed: int = 2, out_f: int = OUT, in_f: int = IN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(out_f, in_f, generator=gen) + 0.05


def stats_for(name: str, x: torch.Tensor, fisher: torch.Tensor) -> LayerStats:
    """Only what the method declares it needs: using anything else would fail on None."""
    needs = get_method(name).needs
    return LayerStats(
        input_gram=(x.T @ x) if "input_gram" in needs else None,
        tokens=len(x) if "input_gram" in needs else 0,
        fisher=fisher if "fisher" in needs else None,
    )


def error_in_metric(
    name: str, w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor, fisher: torch.Tensor
) -> float:
    needs = get_method(name).needs
    diff = (w - approx).double()  # (out, in)
    if "fisher" in needs:
        importance = fisher.double().sum(dim=1)  # (out,)
        return float((importance * diff.square().sum(dim=1)).sum())
    if "input_gram" in needs:
        return float((diff @ x.T).square().sum())
    return float(diff.square().sum())


def output_error(w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - approx).double() @ x.T).square().sum())


def run(name: str, w: torch.Tensor, x: torch.Tensor, fisher: torch.Tensor, rank: int):
    return get_method(name).factorize(w, stats_for(name, x, fisher), rank, OPTIONS)


# --- contract ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_registry_entry_follows_the_contract(name: str) -> None:
    method = get_method(name)
    assert method.name == name
    assert set(method.needs) <= {"input_gram", "fisher"}


def test_unknown_method_is_a_rankwise_error() -> None:
    with pytest.raises(RankwiseError, match="svd"):
        get_method("no-such-method")


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).needs])
def test_missing_statistics_raise_calibration_error(name: str) -> None:
    with pytest.raises(CalibrationError):
        get_method(name).factorize(weight(), LayerStats(), 4, OPTIONS)


# --- the common matrix ------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("rank", [1, 7, 16])
def test_factor_shapes_and_dtype(name: str, rank: int) -> None:
    factors = run(name, weight(), inputs(), fisher_for(), rank)
    kept = rank if factors.sparse is None else factors.left.shape[1]  # sparse spends part of it
    assert kept <= rank
    assert factors.left.shape == (OUT, kept)
    assert factors.right.shape == (kept, IN)
    assert factors.left.dtype == factors.right.dtype == torch.float32
    if factors.spectrum is not None:
        spectrum = factors.spectrum
        assert spectrum.shape == (min(OUT, IN),)
        assert (spectrum >= 0).all()
        assert (spectrum[:-1] >= spectrum[1:] - 1e-5 * spectrum[0]).all()  # sorted, descending


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_factors_keep_the_weight_dtype(name: str, dtype: torch.dtype) -> None:
    """A bf16 model must get bf16 factors, else its forward pass fails on mixed dtypes."""
    factors = run(name, weight().to(dtype), inputs(), fisher_for(), 5)
    assert factors.left.dtype == factors.right.dtype == dtype


@pytest.mark.parametrize("name", METHODS)
def test_error_does_not_increase_with_rank(name: str) -> None:
    w, x, fisher = weight(), inputs(), fisher_for()
    errors = []
    for rank in (1, 2, 4, 8, 12, 16, 20, 24):
        factors = run(name, w, x, fisher, rank)
        errors.append(error_in_metric(name, w, factors.approximation(), x, fisher))
    scale = errors[0]
    for lower, higher in zip(errors, errors[1:], strict=False):
        assert higher <= lower + 1e-6 * scale, errors
    assert errors[-1] < 1e-6 * scale  # rank 24 = min(out, in) is exact


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("shape", [(OUT, IN), (IN, OUT)])
def test_full_rank_reconstructs_the_weight(name: str, shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    w = weight(out_f=out_f, in_f=in_f)
    x = inputs() if in_f == IN else inputs()[:, :in_f]
    factors = run(name, w, x, fisher_for(out_f=out_f, in_f=in_f), min(shape))
    torch.testing.assert_close(factors.approximation(), w, rtol=1e-4, atol=1e-4)


# --- whitening ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 5, 12, 20])
def test_whiten_output_error_equals_dropped_spectrum(rank: int) -> None:
    """||(W - L R) X^T||_F^2 is exactly the sum of the dropped squared singular values."""
    w, x = weight(), inputs()
    factors = run("whiten", w, x, fisher_for(), rank)
    measured = output_error(w, factors.left @ factors.right, x)
    dropped = float(factors.spectrum[rank:].double().square().sum())
    assert measured == pytest.approx(dropped, rel=1e-4)
    # and the spectrum's total energy is the full output energy, so rel_error is honest
    total = float((w.double() @ x.T).square().sum())
    assert float(factors.spectrum.double().square().sum()) == pytest.approx(total, rel=1e-4)
    assert relative_error(factors.spectrum, rank) == pytest.approx(
        (measured / total) ** 0.5, rel=1e-4
    )


@pytest.mark.parametrize("rank", [4, 10])
def test_whiten_beats_svd_on_calibration_output(rank: int) -> None:
    w, x = weight(), inputs()
    whiten = run("whiten", w, x, fisher_for(), rank)
    svd = run("svd", w, x, fisher_for(), rank)
    assert output_error(w, whiten.left @ whiten.right, x) < output_error(w, svd.left @ svd.right, x)


def test_svd_is_optimal_in_weight_error() -> None:
    """Eckart-Young: the dropped squared singular values are the weight error."""
    w = weight()
    factors = run("svd", w, inputs(), fisher_for(), 6)
    error = float((w - factors.left @ factors.right).double().square().sum())
    assert error == pytest.approx(float(factors.spectrum[6:].double().square().sum()), rel=1e-4)


@pytest.mark.parametrize("rank", [3, 12])
def test_whiten_output_side_equals_the_whitened_svd_on_an_invertible_gram(rank: int) -> None:
    """Layers no wider out than in project W on its outputs' principal directions instead of
    undoing a whitening: same factors, same spectrum."""
    w, x = weight(), inputs()  # (OUT <= IN)
    factors = run("whiten", w, x, fisher_for(), rank)
    eigvecs, roots = whitening_basis(x.T @ x, OPTIONS.eig_floor)
    u, s, vh = torch.linalg.svd((w.double() @ eigvecs) * roots, full_matrices=False)
    left, right_white = split_singular(u, s, vh, rank)
    right = (right_white / roots) @ eigvecs.T
    torch.testing.assert_close(factors.spectrum.double(), s, rtol=1e-5, atol=1e-5 * float(s[0]))
    torch.testing.assert_close(factors.left @ factors.right, (left @ right).float())
    # balanced like the input side's: the same column and row norms
    torch.testing.assert_close(
        factors.left.norm(dim=0).double(), left.norm(dim=0), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        factors.right.norm(dim=1).double(), right.norm(dim=1), rtol=1e-4, atol=0
    )
    spectrum = get_method("whiten").spectrum(w, LayerStats(input_gram=x.T @ x), OPTIONS)
    torch.testing.assert_close(spectrum, factors.spectrum)


@pytest.mark.parametrize("method", ["whiten", "sparse"])
def test_whiten_from_the_output_gram_equals_whiten_from_the_input_gram(method: str) -> None:
    """A narrow layer's factors need only Y^T Y = W X^T X W^T, which calibration may gather
    instead of the input gram; sparse fits in the input's metric and says it cannot."""
    w, x = weight(), inputs()  # (OUT < IN)
    y = x @ w.double().T  # (tokens, out)
    from_input = run("whiten", w, x, fisher_for(), 6)
    from_output = get_method("whiten").factorize(w, LayerStats(output_gram=y.T @ y), 6, OPTIONS)
    torch.testing.assert_close(
        from_output.left @ from_output.right, from_input.left @ from_input.right
    )
    torch.testing.assert_close(from_output.spectrum, from_input.spectrum)
    spectrum = get_method("whiten").spectrum(w, LayerStats(output_gram=y.T @ y), OPTIONS)
    torch.testing.assert_close(spectrum, from_input.spectrum)
    assert get_method(method).output_grams == (method == "whiten")


def test_whiten_output_side_of_a_zero_gram_is_finite() -> None:
    """Outputs the data never excites: nothing to balance by, factors stay finite."""
    w = weight()
    factors = run("whiten", w, torch.zeros(5, IN, dtype=torch.float64), fisher_for(), 4)
    assert torch.isfinite(factors.left).all() and torch.isfinite(factors.right).all()
    assert (factors.spectrum == 0).all()


def test_whiten_reuses_the_basis_of_a_shared_gram() -> None:
    """q/k/v share one gram object: the result must equal that of a fresh copy of the gram."""
    method = get_method("whiten")
    x = inputs()
    gram = x.T @ x
    first = method.factorize(weight(1), LayerStats(input_gram=gram), 6, OPTIONS)
    second = method.factorize(weight(2), LayerStats(input_gram=gram), 6, OPTIONS)
    fresh = get_method("whiten").factorize(
        weight(2), LayerStats(input_gram=gram.clone()), 6, OPTIONS
    )
    torch.testing.assert_close(second.left @ second.right, fresh.left @ fresh.right)
    assert not torch.allclose(first.left @ first.right, second.left @ second.right)


def test_split_singular_balances_the_factors() -> None:
    u, s, vh = torch.linalg.svd(weight(), full_matrices=False)
    left, right = split_singular(u, s, vh, 5)
    torch.testing.assert_close(left @ right, (u[:, :5] * s[:5]) @ vh[:5])
    torch.testing.assert_close(left.norm(dim=0), right.norm(dim=1))


# --- singular grams ----------------------------------------------------------------------------

SINGULAR_CASES = {
    "dead_channels": lambda: inputs(dead=8),
    "fewer_tokens_than_features": lambda: inputs(tokens=10),
    "one_token": lambda: inputs(tokens=1),
}


@pytest.mark.parametrize("case", sorted(SINGULAR_CASES))
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("rank", [3, 12])
def test_singular_gram_gives_finite_factors(name: str, case: str, rank: int) -> None:
    w, x = weight(), SINGULAR_CASES[case]()
    factors = run(name, w, x, fisher_for(), rank)
    assert torch.isfinite(factors.left).all() and torch.isfinite(factors.right).all()
    if factors.spectrum is not None:
        assert torch.isfinite(factors.spectrum).all()


@pytest.mark.parametrize("case", sorted(SINGULAR_CASES))
@pytest.mark.parametrize("name", [n for n in METHODS if "input_gram" in get_method(n).needs])
@pytest.mark.parametrize("rank", [3, 12])
def test_singular_gram_output_error_no_worse_than_svd(name: str, case: str, rank: int) -> None:
    w, x = weight(), SINGULAR_CASES[case]()
    ours = run(name, w, x, fisher_for(), rank)
    svd = run("svd", w, x, fisher_for(), rank)
    baseline = output_error(w, svd.left @ svd.right, x)
    assert output_error(w, ours.approximation(), x) <= baseline * (1 + 1e-4) + 1e-9


def test_whiten_on_rank_deficient_gram_is_exact_on_the_data() -> None:
    """10 tokens span at most 10 directions: rank 10 reproduces the outputs exactly."""
    w, x = weight(), inputs(tokens=10)
    factors = run("whiten", w, x, fisher_for(), 10)
    total = float((w.double() @ x.T).square().sum())
    assert output_error(w, factors.left @ factors.right, x) < 1e-6 * total


@pytest.mark.parametrize("name", [n for n in METHODS if "fisher" in get_method(n).needs])
def test_fisher_with_zero_rows_gives_finite_factors(name: str) -> None:
    fisher = fisher_for()
    fisher[:5] = 0.0  # output units the loss never noticed
    factors = run(name, weight(), inputs(), fisher, 6)
    assert torch.isfinite(factors.left).all() and torch.isfinite(factors.right).all()


# --- Fisher weighting --------------------------------------------------------------------------


def fisher_weighted_error(w: torch.Tensor, approx: torch.Tensor, fisher: torch.Tensor) -> float:
    importance = fisher.double().sum(dim=1)  # I_i, (out,)
    return float((importance * (w - approx).double().square().sum(dim=1)).sum())


@pytest.mark.parametrize("rank", [4, 8])
def test_fwsvd_beats_svd_when_rows_differ_in_importance(rank: int) -> None:
    w = weight()
    fisher = torch.ones(OUT, IN)
    fisher[:4] *= 100.0  # four output units matter 100x more
    fw = run("fwsvd", w, inputs(), fisher, rank)
    svd = run("svd", w, inputs(), fisher, rank)
    fw_error = fisher_weighted_error(w, fw.left @ fw.right, fisher)
    svd_error = fisher_weighted_error(w, svd.left @ svd.right, fisher)
    assert fw_error < 0.8 * svd_error
    # the important rows are kept much better ...
    fw_rows = (w - fw.left @ fw.right)[:4].norm()
    svd_rows = (w - svd.left @ svd.right)[:4].norm()
    assert fw_rows < 0.5 * svd_rows
    # ... at the price of plain weight error, where SVD is optimal
    assert (w - svd.left @ svd.right).norm() <= (w - fw.left @ fw.right).norm() + 1e-5


def test_fwsvd_with_uniform_fisher_equals_svd() -> None:
    w = weight()
    fisher = torch.full((OUT, IN), 0.5)
    fw = run("fwsvd", w, inputs(), fisher, 6)
    svd = run("svd", w, inputs(), fisher, 6)
    torch.testing.assert_close(fw.left @ fw.right, svd.left @ svd.right, rtol=1e-4, atol=1e-4)
