"""Every bad input gets its named error class from rankwise.core.errors, and nothing is written."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers
from conftest import (
    FakeTokenizer,
    make_model,
    make_windows,
    model_output,
    word_text,
    word_tokenizer,
)
from pydantic import ValidationError
from torch import nn

import rankwise
from rankwise.allocation.budget import allocate_uniform
from rankwise.calibration.statistics import collect
from rankwise.core.errors import (
    CalibrationError,
    ModelNotFoundError,
    NonFiniteWeightsError,
    OutputExistsError,
    OutputNotWritableError,
    RankwiseError,
    RatioError,
    RecipeError,
    UnsupportedArchitectureError,
)
from rankwise.core.recipe import LayerOverride, Recipe
from rankwise.data.corpora import read_user_text, token_windows
from rankwise.model.accounting import LayerShape
from rankwise.model.layers import LowRankLinear
from rankwise.model.targets import find_targets

IDS = make_windows(2, 10, seed=3)
BAD_RATIOS = [0.0, 1.0, 1.5, -0.1, math.nan, math.inf]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: equal snapshots mean nothing changed."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def untouched(model: nn.Module, before: torch.Tensor) -> bool:
    no_factors = not any(isinstance(m, LowRankLinear) for m in model.modules())
    return no_factors and torch.equal(model_output(model, IDS), before)


def compressed_result(family: str = "llama") -> rankwise.Compressed:
    return rankwise.compress(
        make_model(family), Recipe(allocation="uniform", method="svd", ratio=0.3)
    )


# --- ratios ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_bad_ratio_in_recipe(ratio: float) -> None:
    with pytest.raises(RatioError, match="ratio"):
        Recipe(ratio=ratio)


@pytest.mark.parametrize("ratio", BAD_RATIOS)
def test_bad_ratio_as_flag_over_a_recipe(ratio: float) -> None:
    with pytest.raises(RatioError):
        Recipe().merged(ratio=ratio)


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_bad_override_ratio_is_refused_by_the_recipe(ratio: float) -> None:
    """Caught when the recipe is built, not after a calibration pass."""
    with pytest.raises(RatioError):
        Recipe(overrides=[LayerOverride(pattern="k_proj", ratio=ratio)])
    with pytest.raises(RatioError):
        Recipe(overrides=[{"pattern": "k_proj", "ratio": ratio}])


def test_bad_ratio_in_allocation() -> None:
    with pytest.raises(RatioError):
        allocate_uniform([LayerShape("a", 8, 8)], 1.0)


def test_bad_ratio_in_recipe_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("method: svd\nratio: 1.5\n")
    with pytest.raises(RatioError):
        Recipe.from_yaml(path)


# --- models ------------------------------------------------------------------------------------


def test_missing_model_path() -> None:
    with pytest.raises(ModelNotFoundError, match="/nonexistent"):
        rankwise.load_model("/nonexistent")


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="gguf"):
        rankwise.load_model(str(path))


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        rankwise.load_model(str(tmp_path))


def test_load_refuses_a_dense_directory(tmp_path: Path) -> None:
    make_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(ModelNotFoundError):
        rankwise.load(tmp_path / "dense")
    with pytest.raises(ModelNotFoundError):
        rankwise.load(tmp_path / "nothing-here")


def test_load_refuses_weights_that_do_not_match(tmp_path: Path) -> None:
    out = Path(rankwise.save(compressed_result(), str(tmp_path / "m")))
    config = json.loads((out / "config.json").read_text())
    for entry in config["rankwise"]["layers"]:  # the manifest no longer says it is factorized
        if entry["name"] == "model.layers.0.mlp.up_proj":
            entry["rank"] = None
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError, match="do not match"):
        rankwise.load(out)


def xglm_model() -> nn.Module:
    """A family with no built-in targets (OPT-like names)."""
    config = transformers.XGLMConfig(
        vocab_size=128,
        d_model=64,
        ffn_dim=128,
        num_layers=2,
        attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    config.architectures = ["XGLMForCausalLM"]
    torch.manual_seed(0)
    return transformers.XGLMForCausalLM(config).eval()


XGLM_TARGETS = [r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)$"]


def test_unsupported_architecture_names_it_and_suggests_targets() -> None:
    model = xglm_model()
    assert model.config.model_type not in rankwise.model.targets.BLOCK_LINEARS
    before = model_output(model, IDS)
    with pytest.raises(UnsupportedArchitectureError) as info:
        rankwise.compress(model, Recipe(allocation="uniform", method="svd"))
    message = str(info.value)
    assert "'xglm'" in message and "--targets" in message
    assert untouched(model, before)


def test_unsupported_plain_module_names_its_class() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="Sequential"):
        find_targets(nn.Sequential(nn.Linear(4, 4)))


def test_targets_that_match_nothing() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="matches"):
        find_targets(make_model("llama"), targets=[r"no_such_layer$"])


@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_explicit_targets_make_an_unsupported_architecture_work(
    method: str, tmp_path: Path
) -> None:
    model = xglm_model()
    recipe = Recipe(
        allocation="uniform", method=method, ratio=0.3, targets=XGLM_TARGETS, calib_dtype="float32"
    )
    result = rankwise.compress(model, recipe, windows=make_windows())
    assert len(result.layers) == 2 * 6
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in result.ranks)
    loaded = rankwise.load(rankwise.save(result, str(tmp_path / "xglm")))
    assert type(loaded) is transformers.XGLMForCausalLM
    torch.testing.assert_close(
        model_output(loaded, IDS), model_output(model, IDS), atol=1e-5, rtol=0
    )


def test_unknown_method_before_any_work() -> None:
    model = make_model("llama")
    before = model_output(model, IDS)
    with pytest.raises(RankwiseError, match="unknown method"):
        rankwise.compress(
            model, Recipe(allocation="uniform", method="nope"), windows=make_windows()
        )
    assert untouched(model, before)


# --- calibration text --------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_calibration_text(text: str, fake_tokenizer: FakeTokenizer) -> None:
    with pytest.raises(CalibrationError, match="empty"):
        token_windows(fake_tokenizer, text, seq_len=8, count=2)


def test_too_short_calibration_text(fake_tokenizer: FakeTokenizer) -> None:
    with pytest.raises(CalibrationError, match="too short: 5 tokens"):
        token_windows(fake_tokenizer, "one two three four five", seq_len=8, count=2)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.txt", "", "empty"),
        ("blank.txt", "  \n\n  ", "empty"),
        ("empty.jsonl", "", "empty"),
        ("blank.jsonl", "\n\n", "empty"),
        ("bad.jsonl", '{"text": "fine"}\n{"text": broken\n', ":2:"),
        ("nokey.jsonl", '{"body": "x"}\n', ":1:"),
        ("list.jsonl", '["text"]\n', ":1:"),
        ("string.jsonl", '"just a string"\n', ":1:"),
        ("null.jsonl", '{"text": "fine"}\n{"text": null}\n', ":2:"),
        ("number.jsonl", '{"text": 5}\n', ":1:"),
    ],
)
def test_bad_calibration_file(tmp_path: Path, name: str, content: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CalibrationError, match=match):
        read_user_text(path)


def test_calibration_jsonl_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(CalibrationError, match="UTF-8"):
        read_user_text(path)


def test_missing_calibration_file(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="not found"):
        read_user_text(tmp_path / "absent.txt")


@pytest.mark.parametrize(
    ("name", "content"), [("empty.txt", ""), ("short.txt", "w1 w2 w3"), ("bad.jsonl", "{")]
)
def test_bad_calibration_text_through_compress(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    model = make_model("llama")
    before = model_output(model, IDS)
    recipe = Recipe(
        allocation="uniform",
        method="whiten",
        calib=str(path),
        samples=2,
        seq_len=16,
        calib_dtype="float32",
    )
    with pytest.raises(CalibrationError):
        rankwise.compress(model, recipe, tokenizer=word_tokenizer())
    assert untouched(model, before)


def test_calibration_from_a_user_file_works(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": word_text(40, seed=i)}) for i in range(3)))
    recipe = Recipe(
        allocation="uniform",
        method="whiten",
        calib=str(path),
        samples=4,
        seq_len=16,
        calib_dtype="float32",
    )
    result = rankwise.compress(make_model("llama"), recipe, tokenizer=word_tokenizer())
    assert all(layer.rank is not None for layer in result.layers)


def test_calibration_needs_a_tokenizer_or_windows() -> None:
    model = make_model("llama")
    before = model_output(model, IDS)
    with pytest.raises(CalibrationError, match="tokenizer"):
        rankwise.compress(model, Recipe(allocation="uniform", method="whiten"))
    assert untouched(model, before)


def test_no_windows_at_all() -> None:
    model = make_model("llama")
    with pytest.raises(CalibrationError):
        collect(model, find_targets(model), torch.zeros(0, 8, dtype=torch.long), frozenset())


# --- weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["svd", "whiten"])
def test_non_finite_targeted_weight(bad: float, method: str) -> None:
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.1\.mlp\.up_proj"):
        rankwise.compress(
            model, Recipe(allocation="uniform", method=method), windows=make_windows()
        )
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_non_finite_gpt2_conv1d_weight() -> None:
    model = make_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteWeightsError, match="c_attn"):
        rankwise.compress(model, Recipe(allocation="uniform", method="svd"))


# --- output ------------------------------------------------------------------------------------


def test_existing_output_directory_is_refused_and_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "more.bin").write_bytes(b"\1\2\3")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        rankwise.save(compressed_result(), str(out))
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling


def test_overwrite_replaces_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    result = compressed_result()
    rankwise.save(result, str(out), overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    torch.testing.assert_close(
        model_output(rankwise.load(out), IDS), model_output(result.model, IDS), atol=1e-5, rtol=0
    )


def test_existing_file_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError):
            rankwise.save(compressed_result(), str(out), overwrite=overwrite)
    assert out.read_text() == "a file"


def test_output_under_a_regular_file(tmp_path: Path) -> None:
    parent = tmp_path / "plain-file"
    parent.write_text("not a directory")
    before = snapshot(tmp_path)
    for out in (parent / "out", parent / "deeper" / "out"):
        with pytest.raises(OutputNotWritableError, match="not a directory"):
            rankwise.save(compressed_result(), str(out))
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_output_under_a_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputNotWritableError):
            rankwise.save(compressed_result(), str(locked / "out"))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_output_where_access_is_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a read-only parent looks like to a non-root user (root passes every access check)."""
    denied = tmp_path / "denied"
    denied.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        "rankwise.storage.saved.os.access",
        lambda path, mode: Path(path) != denied and real_access(path, mode),
    )
    for out in (denied / "out", denied / "a" / "b" / "out"):
        with pytest.raises(OutputNotWritableError, match="cannot write"):
            rankwise.save(compressed_result(), str(out))
    assert list(denied.iterdir()) == []


def test_missing_parents_are_created(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    rankwise.save(compressed_result(), str(out))
    assert (out / "config.json").is_file()


class ExplodingTokenizer:
    def save_pretrained(self, path: str) -> None:
        (Path(path) / "tokenizer.json").write_text("{")  # half written ...
        raise OSError("disk full")  # ... then the write fails


def test_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="disk full"):
        rankwise.save(compressed_result(), str(tmp_path / "out"), tokenizer=ExplodingTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    before = snapshot(tmp_path)
    with pytest.raises(OSError):
        rankwise.save(compressed_result(), str(out), ExplodingTokenizer(), overwrite=True)
    assert snapshot(tmp_path) == before


# --- recipes -----------------------------------------------------------------------------------


def test_recipe_refuses_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        Recipe(ratios=0.3)
    with pytest.raises(ValidationError):
        LayerOverride(pattern="x", rank=3)
    with pytest.raises(ValidationError):
        Recipe(samples=0)
    with pytest.raises(ValidationError):
        Recipe(calib_dtype="float16")


def test_recipe_file_with_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("method: whiten\nratio: 0.3\nsampels: 4\n")
    with pytest.raises(RecipeError, match="sampels"):
        Recipe.from_yaml(path)


@pytest.mark.parametrize(
    "content", ["method: [unclosed\n", "allocation: best\n", "overrides:\n  - ratio: 0.5\n"]
)
def test_invalid_recipe_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(content)
    with pytest.raises(RecipeError, match=str(path)):
        Recipe.from_yaml(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        Recipe.from_yaml(tmp_path / "absent.yaml")


def test_every_error_is_a_rankwise_error() -> None:
    for cls in (
        ModelNotFoundError,
        UnsupportedArchitectureError,
        RatioError,
        CalibrationError,
        NonFiniteWeightsError,
        OutputExistsError,
        OutputNotWritableError,
        RecipeError,
    ):
        assert issubclass(cls, RankwiseError)
