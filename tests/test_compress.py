"""compress -> save -> load on tiny random models of every supported family, with accounting."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from conftest import (
    CAUSAL,
    FAMILIES,
    clone,
    make_model,
    make_windows,
    model_output,
    saved_targets,
    word_tokenizer,
)
from torch import nn

import rankwise
from rankwise.allocation.budget import allocate_uniform, targeted_params, uniform_rank
from rankwise.core.errors import RankwiseError
from rankwise.core.recipe import LayerOverride, Recipe
from rankwise.model.accounting import LayerShape, count_parameters
from rankwise.model.layers import LowRankLinear
from rankwise.storage.manifest import Manifest

CASES = [(family, method) for family in FAMILIES for method in ("svd", "whiten", "sparse")] + [
    (family, "fwsvd") for family in CAUSAL
]
TARGETS_PER_BLOCK = {"llama": 7, "qwen2": 7, "gemma3": 7, "gpt2": 4, "bert": 6}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(123))


def run(model: nn.Module, **recipe: object) -> rankwise.Compressed:
    # "never": these tests check the stored structure, which "auto" may merge on this machine
    recipe = {"calib_dtype": "float32", "allocation": "uniform", "merge_policy": "never", **recipe}
    return rankwise.compress(model, Recipe(**recipe), windows=make_windows())


def saved_block(directory: str | Path) -> dict:
    return Manifest.read(directory).to_block()


def hand_counted(targets: dict[str, dict]) -> tuple[int, int]:
    """(dense, kept) weight parameters of the targets, from the saved shapes and ranks."""
    dense = sum(t["out"] * t["in"] for t in targets.values())
    kept = sum(
        t["out"] * t["in"] if t["rank"] is None else t["rank"] * (t["out"] + t["in"])
        for t in targets.values()
    )
    return dense, kept


@pytest.mark.parametrize(("family", "method"), CASES)
def test_save_load_round_trip(family: str, method: str, tmp_path: Path) -> None:
    model = make_model(family)
    dense_out = model_output(clone(model), IDS)
    result = run(model, method=method, ratio=0.3)
    assert result.model is model  # compressed in place
    compressed_out = model_output(model, IDS)
    assert not torch.allclose(compressed_out, dense_out, atol=1e-3)  # something changed

    out = rankwise.save(result, str(tmp_path / "model"))
    loaded = rankwise.load(out)

    assert type(loaded) is type(model)
    assert not loaded.training
    torch.testing.assert_close(model_output(loaded, IDS), compressed_out, rtol=0, atol=1e-5)
    low_rank = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert low_rank == {n: r for n, r in result.ranks.items() if r is not None}
    assert len(result.layers) == TARGETS_PER_BLOCK[family] * 2
    assert count_parameters(loaded) == result.model_params_after
    if getattr(loaded.config, "tie_word_embeddings", False) and family != "bert":
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert Recipe.from_yaml(Path(out) / "recipe.yaml") == result.recipe
    assert {p.suffix for p in Path(out).iterdir()} <= {".json", ".safetensors", ".yaml"}


@pytest.mark.parametrize(("family", "method"), CASES)
def test_error_shrinks_as_ratio_shrinks(family: str, method: str) -> None:
    mild = run(make_model(family), method=method, ratio=0.2)
    harsh = run(make_model(family), method=method, ratio=0.6)

    def mean_error(result: rankwise.Compressed) -> float:
        errors = [layer.rel_error for layer in result.layers if layer.rank is not None]
        return sum(errors) / len(errors)

    assert 0.0 < mean_error(mild) < mean_error(harsh) < 1.0
    for a, b in zip(mild.layers, harsh.layers, strict=True):
        assert a.name == b.name and a.rank > b.rank


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_ratio_accounting(family: str, ratio: float, tmp_path: Path) -> None:
    result = run(make_model(family), method="svd", ratio=ratio)
    assert ratio <= result.targeted_ratio < ratio + 0.05
    assert 0.0 < result.model_ratio < result.targeted_ratio

    out = rankwise.save(result, str(tmp_path / "model"))
    block = saved_block(out)
    assert hand_counted(saved_targets(out)) == (result.targeted_before, result.targeted_after)
    assert block["targeted_params_before"] == result.targeted_before
    assert block["targeted_params_after"] == result.targeted_after
    assert block["targeted_ratio"] == pytest.approx(result.targeted_ratio)
    assert block["model_ratio"] == pytest.approx(result.model_ratio)
    assert block["ratio"] == ratio and block["method"] == "svd"
    # the whole model shrinks by exactly the removed targeted parameters (biases unchanged)
    removed = result.targeted_before - result.targeted_after
    assert result.model_params_before - result.model_params_after == removed
    assert count_parameters(rankwise.load(out)) == result.model_params_after


def test_dense_override_keeps_layer_dense_through_save_and_load(tmp_path: Path) -> None:
    model = make_model("llama")
    recipe = {"overrides": [LayerOverride(pattern=r"k_proj$", dense=True)]}
    result = run(model, method="whiten", ratio=0.4, **recipe)
    k_names = [n for n in result.ranks if n.endswith("k_proj")]
    assert k_names and all(result.ranks[n] is None for n in k_names)
    assert all(r is not None for n, r in result.ranks.items() if n not in k_names)
    for layer in result.layers:
        if layer.rank is None:
            assert layer.rel_error == 0.0 and layer.count.kept_fraction == 1.0

    expected = model_output(model, IDS)
    out = rankwise.save(result, str(tmp_path / "model"))
    loaded = rankwise.load(out)
    for name in k_names:
        assert type(loaded.get_submodule(name)) is nn.Linear
    torch.testing.assert_close(model_output(loaded, IDS), expected, rtol=0, atol=1e-5)
    assert not any(n in Manifest.read(out).factorized() for n in k_names)
    assert all(saved_targets(out)[n]["rank"] is None for n in k_names)
    assert hand_counted(saved_targets(out)) == (result.targeted_before, result.targeted_after)


def test_per_layer_ratio_override() -> None:
    plain = run(make_model("llama"), method="svd", ratio=0.2)
    same = run(make_model("llama"), method="svd", ratio=0.2, overrides=[{"pattern": "mlp"}])
    assert same.ranks == plain.ranks  # an override without settings changes nothing

    result = run(
        make_model("llama"),
        method="svd",
        ratio=0.2,
        overrides=[{"pattern": "k_proj", "ratio": 0.8}],
    )
    for layer in result.layers:
        shape = LayerShape(layer.name, layer.out_features, layer.in_features)
        layer_ratio = 0.8 if layer.name.endswith("k_proj") else 0.2
        exact = (1 - layer_ratio) * shape.break_even_rank  # the fractional rank asked for
        assert abs(layer.rank - exact) < 1.0, (layer.name, layer.rank, exact)
        assert 1.0 - layer.count.kept_fraction == pytest.approx(layer_ratio, abs=0.05)


class TwoLinears(nn.Module):
    """Not a transformers model: one ordinary layer and one whose factors could never pay."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(128, 64)
        self.wide = nn.Linear(64, 64)
        self.narrow = nn.Linear(64, 1)  # break-even rank 64/65 < 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        return self.narrow(self.wide(hidden))


def test_layer_that_cannot_save_parameters_stays_dense() -> None:
    model = TwoLinears().eval()
    ids = make_windows(2, 8)
    result = rankwise.compress(
        model,
        Recipe(allocation="uniform", method="svd", ratio=0.01, targets=["wide$", "narrow$"]),
        windows=ids,
    )
    assert result.ranks["narrow"] is None
    assert type(model.narrow) is nn.Linear
    assert isinstance(model.wide, LowRankLinear)
    wide = LayerShape("wide", 64, 64)
    assert result.targeted_before == 64 * 64 + 64
    assert result.targeted_after == wide.factor_params(model.wide.rank) + 64


def test_uniform_rank_and_break_even() -> None:
    square = LayerShape("sq", 64, 64)
    assert square.break_even_rank == 32
    assert uniform_rank(square, 0.25) == 24
    assert uniform_rank(square, 0.99) == 1  # at least rank 1
    assert uniform_rank(LayerShape("row", 1, 64), 0.01) is None
    assert uniform_rank(LayerShape("tiny", 2, 2), 0.5) is None
    shapes = [square, LayerShape("row", 1, 64)]
    ranks = allocate_uniform(shapes, 0.25)
    assert ranks == {"sq": 24, "row": None}
    assert targeted_params(shapes, ranks) == (64 * 64 + 64, 24 * 128 + 64)


def test_ignore_skips_matching_layers() -> None:
    result = run(make_model("llama"), method="svd", ratio=0.3, ignore=[r"mlp\."])
    assert result.layers and all("self_attn" in layer.name for layer in result.layers)


@pytest.mark.parametrize("family", CAUSAL)
def test_loaded_model_generates(family: str, tmp_path: Path) -> None:
    model = make_model(family)
    result = run(model, method="svd", ratio=0.3)
    loaded = rankwise.load(rankwise.save(result, str(tmp_path / "model")))
    prompt = IDS[:1, :4]
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        got = loaded.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert got.shape == (1, 7)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_directory_without_tokenizer_loads_none(family: str, tmp_path: Path) -> None:
    """No tokenizer files: no tokenizer (not an empty one built from the config)."""
    result = run(make_model(family), method="svd", ratio=0.3)
    loaded = rankwise.load_model(rankwise.save(result, str(tmp_path / "model")))
    assert loaded.tokenizer is None
    assert any(isinstance(m, LowRankLinear) for m in loaded.model.modules())
    dense = make_model(family)
    dense.save_pretrained(tmp_path / "dense")
    assert rankwise.load_model(str(tmp_path / "dense")).tokenizer is None


def test_saved_tokenizer_round_trips(tmp_path: Path) -> None:
    tokenizer = word_tokenizer()
    result = run(make_model("llama"), method="svd", ratio=0.3)
    loaded = rankwise.load_model(rankwise.save(result, str(tmp_path / "model"), tokenizer))
    text = "w1 w2 w99 unknown w3"
    assert loaded.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_load_model_reads_a_dense_hf_directory(tmp_path: Path) -> None:
    model = make_model("llama")
    model.save_pretrained(tmp_path / "dense")
    loaded = rankwise.load_model(str(tmp_path / "dense"))
    torch.testing.assert_close(model_output(loaded.model, IDS), model_output(model, IDS))
    assert not any(isinstance(m, LowRankLinear) for m in loaded.model.modules())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_a_loaded_dense_model_holds_its_weights_not_a_map_of_the_file(tmp_path: Path) -> None:
    """So the layers a compression replaces are freed with them (see models.own_memory)."""
    model = make_model("llama")
    model.save_pretrained(tmp_path / "dense")
    loaded = rankwise.load_model(str(tmp_path / "dense"))
    assert str(tmp_path / "dense") not in Path("/proc/self/maps").read_text()
    head = loaded.model.lm_head.weight
    assert head is loaded.model.model.embed_tokens.weight or not model.config.tie_word_embeddings
    torch.testing.assert_close(model_output(loaded.model, IDS), model_output(model, IDS))


def test_fwsvd_on_encoder_raises_and_leaves_model_alone() -> None:
    model = make_model("bert")
    before = model_output(model, IDS)
    with pytest.raises(RankwiseError):
        run(model, method="fwsvd", ratio=0.3)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    torch.testing.assert_close(model_output(model, IDS), before, rtol=0, atol=0)


def test_svd_needs_no_calibration() -> None:
    """Data-free: no tokenizer and no windows are needed."""
    model = make_model("llama")
    result = rankwise.compress(model, Recipe(allocation="uniform", method="svd", ratio=0.3))
    assert all(layer.rank is not None for layer in result.layers)


@pytest.mark.parametrize("method", ["svd", "whiten", "fwsvd"])
def test_compress_a_bfloat16_model(method: str) -> None:
    """Factors take the model's dtype, so the compressed bf16 model still runs."""
    model = make_model("llama").to(torch.bfloat16)
    run(model, method=method, ratio=0.3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(model_output(model, IDS).float()).all()


BASE_MODELS = {
    "llama": transformers.LlamaModel,
    "qwen2": transformers.Qwen2Model,
    "gemma3": transformers.Gemma3TextModel,
    "gpt2": transformers.GPT2Model,
}


@pytest.mark.parametrize("family", sorted(BASE_MODELS))
@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_bare_base_model_round_trip(family: str, method: str, tmp_path: Path) -> None:
    """Without an LM head the blocks sit at the top ("layers.0...", "h.0..."): still targeted."""
    config_cls, _, kwargs = FAMILIES[family]
    config = config_cls(**kwargs)
    config.architectures = [BASE_MODELS[family].__name__]
    torch.manual_seed(0)
    model = BASE_MODELS[family](config).eval()
    result = run(model, method=method, ratio=0.3)
    assert len(result.layers) == TARGETS_PER_BLOCK[family] * 2
    expected = model_output(model, IDS)
    loaded = rankwise.load(rankwise.save(result, str(tmp_path / "model")))
    assert type(loaded) is BASE_MODELS[family]
    torch.testing.assert_close(model_output(loaded, IDS), expected, rtol=0, atol=1e-5)


def test_whiten_on_targets_outside_the_blocks_uses_a_whole_model_pass() -> None:
    """lm_head is not inside the list of blocks: statistics come from one whole-model pass."""
    model = make_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    recipe = Recipe(
        allocation="uniform",
        method="whiten",
        ratio=0.3,
        targets=[r"lm_head$", r"layers\.0\.mlp\.down_proj$"],
        calib_dtype="float32",
    )
    result = rankwise.compress(model, recipe, windows=make_windows())
    assert isinstance(model.lm_head, LowRankLinear)
    assert {layer.name for layer in result.layers} == {"lm_head", "model.layers.0.mlp.down_proj"}
    assert all(0.0 < layer.rel_error < 1.0 for layer in result.layers)


@pytest.mark.parametrize(
    ("family", "block_targets", "ratio"),
    [
        ("llama", r"layers\.{}\.(self_attn|mlp)\.\w+_proj$", 0.25),
        ("gpt2", r"h\.{}\.(attn|mlp)\.c_\w+$", 0.375),
    ],
)
def test_sequential_not_staged_equals_compressing_block_by_block_by_hand(
    family: str, block_targets: str, ratio: float
) -> None:
    """`staged=False`: block k's statistics come from the model whose blocks before k are
    compressed, block k itself dense (GPT-2: a block run twice must not attend to its first
    run's keys, handed over positionally)."""
    windows = make_windows()
    base = make_model(family)
    by_hand = copy.deepcopy(base)
    hand_ranks = {}
    for block in ("0", "1"):
        recipe = Recipe(
            allocation="uniform",
            method="whiten",
            ratio=ratio,
            targets=[block_targets.format(block)],
            calib_dtype="float32",
            sequential=False,
        )
        hand_ranks.update(rankwise.compress(by_hand, recipe, windows=windows).ranks)
    sequential = copy.deepcopy(base)
    recipe = Recipe(
        allocation="uniform",
        method="whiten",
        ratio=ratio,
        calib_dtype="float32",
        sequential=True,
        staged=False,
    )
    assert rankwise.compress(sequential, recipe, windows=windows).ranks == hand_ranks
    torch.testing.assert_close(
        model_output(sequential, IDS), model_output(by_hand, IDS), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize(
    ("family", "groups", "ratio"),
    [
        (
            "llama",
            [
                r"self_attn\.[qkv]_proj",
                r"self_attn\.o_proj",
                r"mlp\.(gate|up|down)_proj",
            ],
            0.25,
        ),
        ("gpt2", [r"attn\.c_attn", r"attn\.c_proj", r"mlp\.c_(fc|proj)"], 0.375),
    ],
)
def test_sequential_equals_compressing_group_by_group_by_hand(
    family: str, groups: list[str], ratio: float
) -> None:
    """Sequential: the statistics of each group of targets that read one input (q/k/v, o,
    and the block's last two, gate/up and down, together) come from the model whose blocks
    before, and groups before in the same block, are compressed.

    The ratios give every tiny layer a whole rank, so allocating per group or for the whole
    model gives the same ranks and only the statistics can differ. GPT-2 hands its blocks the
    key/value cache positionally: a block run several times must not attend to earlier runs' keys.
    """
    windows = make_windows()
    base = make_model(family)
    by_hand = copy.deepcopy(base)
    hand_ranks = {}
    blocks = "layers" if family == "llama" else "h"
    for block in ("0", "1"):
        for group in groups:
            recipe = Recipe(
                allocation="uniform",
                method="whiten",
                ratio=ratio,
                targets=[rf"{blocks}\.{block}\.{group}$"],
                calib_dtype="float32",
                sequential=False,
            )
            hand_ranks.update(rankwise.compress(by_hand, recipe, windows=windows).ranks)
    sequential = copy.deepcopy(base)
    recipe = Recipe(
        allocation="uniform", method="whiten", ratio=ratio, calib_dtype="float32", sequential=True
    )
    assert rankwise.compress(sequential, recipe, windows=windows).ranks == hand_ranks
    torch.testing.assert_close(
        model_output(sequential, IDS), model_output(by_hand, IDS), atol=1e-5, rtol=1e-4
    )
    one_pass = copy.deepcopy(base)
    recipe = Recipe(
        allocation="uniform", method="whiten", ratio=ratio, calib_dtype="float32", sequential=False
    )
    rankwise.compress(one_pass, recipe, windows=windows)
    assert not torch.allclose(model_output(one_pass, IDS), model_output(sequential, IDS))


@pytest.mark.parametrize("method", ["whiten", "sparse"])
def test_one_pass_uniform_run_factorizes_each_block_as_its_grams_complete(
    method: str, tmp_path: Path
) -> None:
    """Uniform ranks need no statistics up front, so a one-pass run factorizes block by block
    (one block's grams in memory): the same model as factorizing from all statistics at once
    (a statistics file forces that path). Whiten's MLP down projection takes the gram of its
    outputs there instead of W G W^T from the input gram: equal up to float32 rounding."""
    windows = make_windows()
    recipe = Recipe(
        allocation="uniform", method=method, ratio=0.3, calib_dtype="float32", sequential=False
    )
    streamed = rankwise.compress(make_model("llama"), recipe, windows=windows)
    assert "calibrate+factorize" in streamed.seconds and "calibrate" not in streamed.seconds
    from_file = recipe.model_copy(update={"stats": str(tmp_path / "stats.safetensors")})
    gathered = rankwise.compress(make_model("llama"), from_file, windows=windows)
    assert "calibrate" in gathered.seconds
    assert streamed.ranks == gathered.ranks
    assert [r.rel_error for r in streamed.layers] == pytest.approx(
        [r.rel_error for r in gathered.layers], rel=1e-5
    )
    torch.testing.assert_close(
        model_output(streamed.model, IDS), model_output(gathered.model, IDS), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize(("method", "stats", "narrow"), [
    ("whiten", False, True), ("whiten", True, False), ("sparse", False, False),
])  # fmt: skip
def test_a_one_pass_importance_run_gathers_output_grams_unless_a_file_is_written(
    method: str, stats: bool, narrow: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All statistics first (importance needs every spectrum): whiten's narrow targets take
    the gram of their outputs there too, except when the statistics go to a file, which keeps
    input grams for any method that reads it later."""
    from rankwise.calibration import statistics as calibrate

    flags: list[bool] = []
    real = calibrate.collect_grams

    def spy(*args: object, **kwargs: object) -> object:
        flags.append(bool(args[6] if len(args) > 6 else kwargs.get("output_grams", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "collect_grams", spy)
    path = str(tmp_path / "stats.safetensors") if stats else None
    recipe = Recipe(method=method, ratio=0.3, calib_dtype="float32", sequential=False, stats=path)
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows())
    assert "calibrate" in result.seconds and flags[0] is narrow
    assert result.targeted_ratio == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("sequential", [True, False])
def test_factors_made_block_by_block_can_be_trained(sequential: bool) -> None:
    """Block-by-block runs factorize inside the calibration's inference_mode; recovery must
    still be able to train the factors in the same process."""
    model = make_model("llama")
    recipe = Recipe(
        allocation="uniform",
        method="whiten",
        ratio=0.3,
        calib_dtype="float32",
        sequential=sequential,
    )
    rankwise.compress(model, recipe, windows=make_windows())
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers
    for layer in layers:
        assert not any(p.is_inference() for p in layer.parameters())
        layer.left.requires_grad_(True)  # raises on an inference tensor
