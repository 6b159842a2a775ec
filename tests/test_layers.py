"""LowRankLinear keeps nn.Linear's interface and computes left @ right @ x + bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.model.layers import LowRankLinear, saves_parameters


def factors(out_f: int = 12, in_f: int = 20, rank: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(out_f, rank, generator=gen)
    right = torch.randn(rank, in_f, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    return left, right, bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_is_left_right_x_plus_bias(with_bias: bool) -> None:
    left, right, bias = factors()
    layer = LowRankLinear.from_factors(left, right, bias if with_bias else None)
    x = torch.randn(3, 7, 20)  # (batch, seq, in)
    expected = x @ (left @ right).T + (bias if with_bias else 0.0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert (layer.bias is None) == (not with_bias)


def test_weight_is_the_dense_product() -> None:
    left, right, bias = factors()
    layer = LowRankLinear.from_factors(left, right, bias)
    assert layer.weight.shape == (12, 20)
    torch.testing.assert_close(layer.weight, left @ right)


def test_from_factors_copies_the_tensors() -> None:
    left, right, bias = factors()
    layer = LowRankLinear.from_factors(left, right, bias)
    left.zero_()
    bias.zero_()
    assert layer.left.abs().sum() > 0
    assert layer.bias.abs().sum() > 0


@pytest.mark.parametrize("with_bias", [True, False])
def test_merge_gives_equal_linear(with_bias: bool) -> None:
    left, right, bias = factors()
    layer = LowRankLinear.from_factors(left, right, bias if with_bias else None)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    assert (merged.in_features, merged.out_features) == (20, 12)
    assert (merged.bias is None) == (not with_bias)
    x = torch.randn(5, 20)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_features_rank_and_parameter_count() -> None:
    layer = LowRankLinear(in_features=20, out_features=12, rank=5)
    assert (layer.in_features, layer.out_features, layer.rank) == (20, 12, 5)
    assert layer.left.shape == (12, 5)
    assert layer.right.shape == (5, 20)
    assert layer.num_parameters() == 5 * (12 + 20) + 12
    assert LowRankLinear(20, 12, 5, bias=False).num_parameters() == 5 * (12 + 20)


def test_extra_repr_shows_the_rank() -> None:
    text = repr(LowRankLinear(in_features=20, out_features=12, rank=5))
    assert "rank=5" in text
    assert "in_features=20" in text and "out_features=12" in text


def test_dtype_is_kept() -> None:
    left, right, bias = factors()
    layer = LowRankLinear.from_factors(left.double(), right.double(), bias.double())
    assert layer.left.dtype == layer.right.dtype == layer.bias.dtype == torch.float64
    assert layer.merge().weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("rank", "out_f", "in_f", "saves"),
    [
        (31, 64, 64, True),  # 31*128 = 3968 < 4096
        (32, 64, 64, False),  # exactly break-even: 32*128 = 4096 costs as much as dense
        (33, 64, 64, False),
        (1, 1, 64, False),  # a 1-row matrix can never be made cheaper
        (1, 2, 2, False),  # 1*(2+2) == 4
        (42, 64, 128, True),  # 42*192 = 8064 < 8192
        (43, 64, 128, False),  # 43*192 = 8256 > 8192
    ],
)
def test_saves_parameters_break_even(rank: int, out_f: int, in_f: int, saves: bool) -> None:
    assert saves_parameters(rank, out_f, in_f) is saves
    # the definition: strictly fewer factor parameters than dense ones
    assert saves == (rank * (out_f + in_f) < out_f * in_f)
