"""Semi-NMF of MLP activations (seminmf.py) and the features command around it (features.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_windows, word_text, word_tokenizer
from test_cli import cli, error_lines

import rankwise
from rankwise.analysis.features import (
    FeatureOptions,
    activation_module,
    analyse,
    collect_activations,
    final_norm,
    kept_correlations,
    token_contexts,
)
from rankwise.analysis.seminmf import (
    FeatureError,
    fit_coefficients,
    least_squares_features,
    semi_nmf,
    svd_relative_error,
)
from rankwise.core.errors import UnsupportedArchitectureError
from rankwise.core.recipe import Recipe


def planted_clusters(tokens: int = 300, k: int = 4, width: int = 40) -> tuple[torch.Tensor, ...]:
    """Tokens that each use one of k mixed-sign features with a positive weight, and labels."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, k, (tokens,), generator=gen)
    coefficients = torch.zeros(tokens, k)
    coefficients[torch.arange(tokens), labels] = torch.rand(tokens, generator=gen) + 0.5
    features = torch.randn(k, width, generator=gen)
    return coefficients @ features, labels


def random_acts(tokens: int = 200, width: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed))


# --- the factorization ------------------------------------------------------------------------


def test_planted_mixtures_are_fitted_and_their_groups_recovered() -> None:
    acts, labels = planted_clusters()
    for seed in range(3):
        fit = semi_nmf(acts, 4, iterations=500, seed=seed)
        assert fit.relative_error < 1e-3
        found = fit.coefficients.argmax(dim=1)
        for cluster in range(4):  # every planted group maps onto one fitted feature, and back
            assert found[labels == cluster].unique().numel() == 1
        assert found.unique().numel() == 4


def test_the_loss_never_rises_and_stays_above_the_svd_floor() -> None:
    acts = random_acts()
    previous = 1.0
    for k in (2, 4, 8, 16):
        fit = semi_nmf(acts, k)
        errors = torch.tensor(fit.errors)
        assert (errors[1:] <= errors[:-1] + 1e-12).all()  # monotone without winner-take-all
        floor = svd_relative_error(acts, k)
        assert floor - 1e-9 <= fit.relative_error < previous  # more features, less error
        assert fit.relative_error < floor + 0.05
        previous = fit.relative_error


def test_coefficients_are_nonnegative_features_unit_and_ordered_by_share() -> None:
    fit = semi_nmf(random_acts(), 6)
    assert (fit.coefficients >= 0).all()
    assert torch.allclose(torch.linalg.norm(fit.features, dim=1), torch.ones(6), atol=1e-5)
    assert (fit.shares[:-1] >= fit.shares[1:]).all()
    shares = fit.coefficients.square().sum(dim=0) / random_acts().square().sum()
    assert torch.allclose(fit.shares, shares, rtol=1e-4)


def test_winner_take_all_keeps_that_many_neurons_per_feature() -> None:
    acts = random_acts(width=50)
    fit = semi_nmf(acts, 5, neurons=7)
    assert ((fit.features != 0).sum(dim=1) <= 7).all()
    assert fit.relative_error < 1.0
    assert fit.relative_error > semi_nmf(acts, 5).relative_error  # sparsity costs fit


def test_fixed_features_read_the_same_activations_back() -> None:
    acts = random_acts()
    fit = semi_nmf(acts, 5, iterations=400, tol=0)
    coefficients, error = fit_coefficients(acts, fit.features, start=fit.coefficients)
    assert error <= fit.relative_error + 1e-9  # never worse than where it starts
    assert (kept_correlations(fit.coefficients, coefficients) > 0.99).all()
    cold, cold_error = fit_coefficients(acts, fit.features)  # from zero
    assert (cold >= 0).all() and cold_error < 1.0


def test_an_unused_feature_gets_a_zero_row_not_a_broken_inverse() -> None:
    acts = random_acts().double()
    gen = torch.Generator().manual_seed(1)
    coefficients = torch.rand(200, 3, dtype=torch.float64, generator=gen)
    coefficients[:, 1] = 0
    features = least_squares_features(acts, coefficients)
    assert torch.isfinite(features).all()
    assert features[1].abs().max() < 1e-12
    expected = torch.linalg.lstsq(coefficients[:, [0, 2]], acts).solution
    assert torch.allclose(features[[0, 2]], expected, atol=1e-8)


@pytest.mark.parametrize(
    ("acts", "k", "message"),
    [
        (torch.full((10, 4), float("nan")), 2, "NaN"),
        (torch.zeros(10, 4), 2, "all zero"),
        (torch.ones(10), 2, "matrix"),
        (torch.ones(0, 4), 1, "matrix"),
        (torch.ones(10, 4), 0, "feature count"),
        (torch.ones(10, 4), 5, "feature count"),
    ],
)
def test_bad_activations_get_the_named_error(acts: torch.Tensor, k: int, message: str) -> None:
    with pytest.raises(FeatureError, match=message):
        semi_nmf(acts, k)


# --- reading a model --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llama", "model.layers.1.mlp.down_proj"),
        ("gpt2", "transformer.h.1.mlp.c_proj"),
        ("bert", "encoder.layer.1.output.dense"),
    ],
)
def test_the_mlp_activation_is_the_widest_input_of_the_block(family: str, expected: str) -> None:
    model = make_model(family)
    assert activation_module(model, FeatureOptions(layer=1)) == expected
    assert activation_module(model, FeatureOptions()) == expected  # middle of 2 blocks
    with pytest.raises(FeatureError, match=r"layer must be in \[0, 1\]"):
        activation_module(model, FeatureOptions(layer=2))
    with pytest.raises(FeatureError, match="no linear layer named"):
        activation_module(model, FeatureOptions(module="nowhere"))


def test_unknown_architecture_asks_for_the_module() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UnsupportedArchitectureError, match="--module"):
        activation_module(model, FeatureOptions())
    assert activation_module(model, FeatureOptions(module="0")) == "0"


def test_activations_are_the_down_projection_inputs_in_token_order() -> None:
    model = make_model("llama")
    windows = make_windows(count=6, seq_len=8)
    acts = collect_activations(model, "model.layers.0.mlp.down_proj", windows)
    assert acts.shape == (48, 128)
    mlp = model.model.layers[0].mlp
    seen = []
    handle = mlp.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=windows)  # one batch: the batching must not matter
    handle.remove()
    expected = mlp.act_fn(mlp.gate_proj(seen[0])) * mlp.up_proj(seen[0])  # (6, 8, 128)
    assert torch.allclose(acts, expected.reshape(48, 128), atol=1e-6)


def test_contexts_stay_inside_their_window() -> None:
    tokenizer = word_tokenizer()
    windows = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert token_contexts(tokenizer, windows, [5, 3], context=2) == [
        "(start) w5[[w6]]",
        "w2 w3[[w4]]",
    ]


def test_against_itself_every_feature_is_kept_and_against_a_compressed_model_less() -> None:
    model = make_model("llama")
    windows = make_windows(count=8, seq_len=16)
    options = FeatureOptions(layer=1, features=4, neurons=0)
    same = analyse(model, word_tokenizer(), windows, options, other=model)
    assert same["activation_change"] == 0.0
    assert all(r["kept"] > 0.999 for r in same["records"])
    assert same["svd_relative_error"] <= same["relative_error"] < 1.0
    assert all(len(r["promotes"]) == 5 and len(r["contexts"]) == 5 for r in same["records"])

    small = rankwise.compress(make_model("llama"), Recipe(method="svd", ratio=0.6)).model
    assert activation_module(small, options) == "model.layers.1.mlp.down_proj"  # factorized too
    other = analyse(model, word_tokenizer(), windows, options, other=small)
    assert other["activation_change"] > 0.1
    assert min(r["kept"] for r in other["records"]) < 0.999


def test_features_cli_reads_a_model_and_what_a_compressed_one_keeps(tmp_path: Path) -> None:
    model = make_model("llama", max_position_embeddings=600)
    model.save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    compressed = rankwise.compress(model, Recipe(method="svd", ratio=0.4))
    rankwise.save(compressed, str(tmp_path / "small"), word_tokenizer())
    (tmp_path / "text.txt").write_text(word_text(400, seed=3))

    result = cli(
        "features", "dense", "--vs", "small", "--text", "text.txt", "--samples", "4",
        "--seq-len", "32", "--features", "3", "--json", "f.json",
        cwd=tmp_path, columns=160,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "f.json").read_text())
    assert figures["module"] == "model.layers.1.mlp.down_proj" and figures["tokens"] == 128
    assert figures["neurons_per_feature"] == 13  # a tenth of the 128-wide MLP
    assert [r["feature"] for r in figures["records"]] == [0, 1, 2]
    assert all(-1.0 <= r["kept"] <= 1.0 for r in figures["records"])
    assert "kept in small" in result.stdout and "[[w" in result.stdout

    result = cli("features", "dense", "--layer", "7", cwd=tmp_path)  # before reading any text
    assert result.returncode == 2 and len(error_lines(result)) == 1
    assert "layer must be in [0, 1]" in result.stderr


@pytest.mark.parametrize(
    ("family", "norm"),
    [("gpt2", "transformer.ln_f"), ("gemma3", "model.norm"), ("bert", None)],
)
def test_other_families_read_through_their_own_norm_and_head(family: str, norm: str) -> None:
    """GPT-2's Conv1D and LayerNorm, Gemma's (1 + w) RMSNorm; an encoder has no head to read."""
    model = make_model(family)
    if norm is not None:
        blocks = "transformer.h" if family == "gpt2" else "model.layers"
        assert final_norm(model, blocks) is model.get_submodule(norm)
    figures = analyse(model, word_tokenizer(), make_windows(count=4, seq_len=16), FeatureOptions())
    records = figures["records"]
    assert len(records) == 32 and figures["width"] in (128, 256)
    if family == "bert":
        assert all(r["promotes"] is None for r in records)
    else:
        assert all(len(r["promotes"]) == 5 for r in records)
