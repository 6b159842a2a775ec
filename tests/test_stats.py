"""Calibration statistics: what they hold, their file round trip, and reuse across ratios."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import clone, make_model, make_windows, model_output, word_text, word_tokenizer
from safetensors.torch import save_file

import rankwise
from rankwise.calibration.grams import SPLIT_FROM, add_gram
from rankwise.calibration.statistics import Statistics, collect
from rankwise.core.errors import RankwiseError
from rankwise.core.recipe import Recipe
from rankwise.model.memory import release_freed_memory
from rankwise.model.modules import cast_copy, linear_weight
from rankwise.model.targets import find_targets

BOTH = frozenset({"input_gram", "fisher"})
IDS = make_windows(2, 12, seed=7)


def reference_grams(model: torch.nn.Module, names: list[str], windows: torch.Tensor) -> dict:
    """X^T X of each target's input, gathered independently with plain forward hooks."""
    grams = {n: 0.0 for n in names}
    handles = []
    for name in names:

        def hook(module: torch.nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams[name] + x.T @ x

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    return grams


def reference_fisher(model: torch.nn.Module, names: list[str], windows: torch.Tensor) -> dict:
    """Sum over windows of the squared LM-loss gradient, as an (out, in) matrix per target."""
    model = clone(model)
    for param in model.parameters():
        param.requires_grad_(True)
    fisher = {n: torch.zeros_like(linear_weight(model.get_submodule(n))) for n in names}
    for window in windows:
        model.zero_grad()
        model(input_ids=window[None], labels=window[None]).loss.backward()
        for name in names:
            module = model.get_submodule(name)
            grad = module.weight.grad
            if type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
                grad = grad.T
            fisher[name] += grad.square()
    return fisher


LlamaStats = tuple[torch.nn.Module, list[str], Statistics]


@pytest.fixture
def llama_stats() -> LlamaStats:
    model = make_model("llama")
    names = find_targets(model)
    return model, names, collect(model, names, make_windows(), BOTH, torch.float32)


def test_grams_are_input_grams(llama_stats: LlamaStats) -> None:
    model, names, stats = llama_stats
    windows = make_windows()
    expected = reference_grams(model, names, windows)
    for name in names:
        layer = stats.layers[name]
        assert layer.input_gram.dtype == torch.float64
        scale = float(expected[name].abs().max())  # float32 products: relative to the largest
        torch.testing.assert_close(layer.input_gram, expected[name], rtol=1e-5, atol=1e-6 * scale)
        assert layer.tokens == windows.numel()


def test_layers_with_one_input_share_one_gram(llama_stats: LlamaStats) -> None:
    _, _, stats = llama_stats
    for block in (0, 1):
        prefix = f"model.layers.{block}."
        q, k, v, o = (
            stats.layers[prefix + f"self_attn.{p}_proj"].input_gram for p in ("q", "k", "v", "o")
        )
        gate, up, down = (
            stats.layers[prefix + f"mlp.{p}_proj"].input_gram for p in ("gate", "up", "down")
        )
        assert q is k is v
        assert gate is up
        assert o is not q and down is not gate


def test_statistics_file_round_trip(llama_stats: LlamaStats, tmp_path: Path) -> None:
    _, names, stats = llama_stats
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = Statistics.load(path)
    assert list(loaded.layers) == list(stats.layers)
    assert loaded.meta == stats.meta == {"windows": 4, "seq_len": 16, "dtype": "float32"}
    for name in names:
        a, b = stats.layers[name], loaded.layers[name]
        assert torch.equal(a.input_gram, b.input_gram)
        assert torch.equal(a.fisher, b.fisher)
        assert a.tokens == b.tokens
        assert b.input_gram.dtype == torch.float64 and b.fisher.dtype == torch.float32
    # shared grams are stored once and stay one object after loading
    for block in (0, 1):
        prefix = f"model.layers.{block}.self_attn."
        q, k, v = (loaded.layers[prefix + f"{p}_proj"].input_gram for p in ("q", "k", "v"))
        assert q is k is v
    assert loaded.has(BOTH, names)
    assert not loaded.has({"fisher"}, [*names, "model.layers.9.mlp.up_proj"])
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_statistics_without_fisher_round_trip(tmp_path: Path) -> None:
    model = make_model("gpt2")
    names = find_targets(model)
    stats = collect(model, names, make_windows(), frozenset({"input_gram"}), torch.float32)
    stats.save(tmp_path / "s.safetensors")
    loaded = Statistics.load(tmp_path / "s.safetensors")
    assert loaded.has({"input_gram"}, names) and not loaded.has({"fisher"}, names)
    assert all(loaded.layers[n].fisher is None for n in names)


def test_loading_a_missing_or_foreign_file_is_a_rankwise_error(tmp_path: Path) -> None:
    with pytest.raises(RankwiseError, match="not found"):
        Statistics.load(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(RankwiseError, match="not a rankwise statistics file"):
        Statistics.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fisher_is_summed_squared_gradient(family: str) -> None:
    model = make_model(family)
    names = find_targets(model)
    windows = make_windows(3, 12)
    stats = collect(model, names, windows, frozenset({"fisher"}), torch.float32)
    expected = reference_fisher(model, names, windows)
    for name in names:
        torch.testing.assert_close(stats.layers[name].fisher, expected[name], rtol=1e-4, atol=1e-9)


def test_fisher_leaves_requires_grad_alone() -> None:
    model = make_model("llama")
    rankwise.compress(model, Recipe(method="fwsvd", ratio=0.3, calib_dtype="float32"), windows=IDS)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["whiten", "fwsvd"])
def test_ratio_sweep_from_saved_statistics_equals_fresh_runs(method: str, tmp_path: Path) -> None:
    base = make_model("llama")
    windows = make_windows()
    path = tmp_path / "stats.safetensors"
    first = rankwise.compress(
        clone(base),
        Recipe(method=method, ratio=0.2, stats=str(path), calib_dtype="float32"),
        windows=windows,
    )
    assert path.is_file()  # written by the first run
    assert first.recipe.stats == str(path)
    for ratio in (0.2, 0.5):
        # no windows and no tokenizer: only the saved statistics can make this work
        reused = rankwise.compress(clone(base), Recipe(method=method, ratio=ratio, stats=str(path)))
        fresh = rankwise.compress(
            clone(base),
            Recipe(method=method, ratio=ratio, calib_dtype="float32", sequential=False),
            windows=windows,
        )
        assert reused.ranks == fresh.ranks
        if method == "fwsvd":
            assert [r.rel_error for r in reused.layers] == [r.rel_error for r in fresh.layers]
            assert torch.equal(model_output(reused.model, IDS), model_output(fresh.model, IDS))
            continue
        # whiten's fresh run takes the MLP down projection's output gram, the file its input
        # gram (W G W^T): the same factors up to float32 rounding
        assert [r.rel_error for r in reused.layers] == pytest.approx(
            [r.rel_error for r in fresh.layers], rel=1e-5
        )
        torch.testing.assert_close(
            model_output(reused.model, IDS), model_output(fresh.model, IDS), atol=1e-5, rtol=1e-4
        )


def test_statistics_missing_what_the_method_needs_are_gathered_again(tmp_path: Path) -> None:
    base = make_model("llama")
    windows = make_windows()
    path = tmp_path / "stats.safetensors"
    rankwise.compress(
        clone(base),
        Recipe(method="whiten", ratio=0.3, stats=str(path), calib_dtype="float32"),
        windows=windows,
    )
    reused = rankwise.compress(
        clone(base),
        Recipe(method="fwsvd", ratio=0.3, stats=str(path), calib_dtype="float32"),
        windows=windows,
    )
    fresh = rankwise.compress(
        clone(base), Recipe(method="fwsvd", ratio=0.3, calib_dtype="float32"), windows=windows
    )
    assert torch.equal(model_output(reused.model, IDS), model_output(fresh.model, IDS))


def test_statistics_file_without_what_the_method_needs_calibrates_from_the_tokenizer(
    tmp_path: Path,
) -> None:
    """A grams-only file given to fwsvd: windows come from the recipe's text, as in a CLI run."""
    text_file = tmp_path / "calib.txt"
    text_file.write_text(word_text(4 * 16))
    path = tmp_path / "stats.safetensors"
    common = dict(
        ratio=0.3,
        stats=str(path),
        calib=str(text_file),
        samples=4,
        seq_len=16,
        calib_dtype="float32",
    )
    tokenizer = word_tokenizer()
    rankwise.compress(make_model("llama"), Recipe(method="whiten", **common), tokenizer=tokenizer)
    result = rankwise.compress(
        make_model("llama"), Recipe(method="fwsvd", **common), tokenizer=tokenizer
    )
    assert Statistics.load(path).has({"fisher"}, list(result.ranks))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cast_copy_is_a_frozen_converted_copy_with_ties_kept(family: str) -> None:
    model = make_model(family, tie_word_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy16 = cast_copy(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy16.parameters())
    assert copy16.get_input_embeddings().weight is copy16.get_output_embeddings().weight
    assert all(p.requires_grad for p in model.parameters())  # the original is untouched
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[key])
    torch.testing.assert_close(
        model_output(copy16, IDS).float(), model_output(model, IDS), rtol=0.05, atol=0.05
    )
    same = cast_copy(model, torch.float32)  # same dtype: storage shared, modules separate
    assert same.model.layers[0] is not model.model.layers[0]
    torch.testing.assert_close(model_output(same, IDS), model_output(model, IDS))


@pytest.mark.parametrize("width", [SPLIT_FROM - 1, SPLIT_FROM, SPLIT_FROM + 77])
def test_gram_of_wide_inputs_from_symmetric_blocks_is_x_transpose_x(width: int) -> None:
    x = torch.randn(300, width, generator=torch.Generator().manual_seed(width))  # (tokens, in)
    total = torch.ones(width, width, dtype=torch.float64)  # added to, not overwritten
    add_gram(total, x)
    expected = 1.0 + x.double().T @ x.double()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-3)
    if width >= SPLIT_FROM:  # built from blocks: symmetric by construction
        assert torch.equal(total, total.T)


@pytest.mark.parametrize("width", [SPLIT_FROM - 1, SPLIT_FROM + 77])
def test_gram_of_bfloat16_inputs_is_within_one_bfloat16_rounding_of_exact(width: int) -> None:
    x = torch.randn(2048, width, generator=torch.Generator().manual_seed(width)).bfloat16()
    total = torch.zeros(width, width, dtype=torch.float64)
    add_gram(total, x)
    add_gram(total, x)  # two batches, each rounded once
    exact = 2 * x.double().T @ x.double()  # (in, in), the gram of the bfloat16 values
    scale = exact.abs() + exact.diagonal().mean() / 64  # off-diagonals are sums of +-products
    assert ((total - exact).abs() / scale).max() < 2**-7
    assert (total - exact).norm() / exact.norm() < 2**-9


def test_releasing_freed_memory_is_safe_to_call_anywhere() -> None:
    before = torch.arange(10.0)
    release_freed_memory()
    release_freed_memory()
    assert torch.equal(before, torch.arange(10.0))
