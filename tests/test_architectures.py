"""Built-in targets for families beyond the common test matrix: each is found without
`--targets`, the block runner sees what the model's own forward does, and a compressed model
saves and loads back to the same outputs (decoders: on the default path, whiten with sequential
calibration and importance allocation, and they still generate)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY_DECODER, VOCAB, build_model, make_model, make_windows, model_output
from test_output_fisher import assert_matches_reference
from test_stats import reference_fisher
from torch import nn

import rankwise
from rankwise.calibration.statistics import collect_fisher, collect_grams, collect_grams_whole
from rankwise.core.recipe import Recipe
from rankwise.model.loading import model_class_for
from rankwise.model.modules import linear_weight
from rankwise.model.targets import BLOCK_LINEARS, find_targets
from rankwise.pipeline.compress import compress

_SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

# family -> (config class, model class, config kwargs, targeted linears per block)
EXTRA: dict[str, tuple[type, type, dict, int]] = {
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(TINY_DECODER, head_dim=16),
        7,
    ),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(TINY_DECODER, head_dim=16),
        7,
    ),
    "smollm3": (
        transformers.SmolLM3Config,
        transformers.SmolLM3ForCausalLM,
        dict(TINY_DECODER, pad_token_id=0),
        7,
    ),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, TINY_DECODER, 7),
    "gemma": (
        transformers.GemmaConfig,
        transformers.GemmaForCausalLM,
        dict(TINY_DECODER, head_dim=16),
        7,
    ),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, TINY_DECODER, 7),
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, TINY_DECODER, 7),
    "stablelm": (transformers.StableLmConfig, transformers.StableLmForCausalLM, TINY_DECODER, 7),
    "phi3": (
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        dict(TINY_DECODER, pad_token_id=0),
        4,  # fused qkv_proj and gate_up_proj
    ),
    "phi": (
        transformers.PhiConfig,
        transformers.PhiForCausalLM,
        dict(_SMALL, intermediate_size=128, max_position_embeddings=64),
        6,
    ),
    "starcoder2": (
        transformers.Starcoder2Config,
        transformers.Starcoder2ForCausalLM,
        TINY_DECODER,
        6,
    ),
    "opt": (
        transformers.OPTConfig,
        transformers.OPTForCausalLM,
        dict(
            _SMALL,
            ffn_dim=128,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
            pad_token_id=0,
        ),
        6,
    ),
    "gpt_neox": (
        transformers.GPTNeoXConfig,
        transformers.GPTNeoXForCausalLM,
        dict(_SMALL, intermediate_size=128, max_position_embeddings=64),
        4,
    ),
    "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM, _SMALL, 4),
    "bloom": (
        transformers.BloomConfig,
        transformers.BloomForCausalLM,
        dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
        4,
    ),
    "gpt_bigcode": (
        transformers.GPTBigCodeConfig,
        transformers.GPTBigCodeForCausalLM,
        dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
        4,
    ),
}

_ENCODER = dict(_SMALL, intermediate_size=128, max_position_embeddings=64, pad_token_id=1)
# encoders (no LM head): importance falls back to uniform, there is no output Fisher
ENCODERS: dict[str, tuple[type, type, dict, int]] = {
    "roberta": (transformers.RobertaConfig, transformers.RobertaModel, _ENCODER, 6),
    "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel, _ENCODER, 6),
    "electra": (
        transformers.ElectraConfig,
        transformers.ElectraModel,
        dict(_ENCODER, embedding_size=64),
        6,
    ),
    "mpnet": (transformers.MPNetConfig, transformers.MPNetModel, _ENCODER, 6),
    "distilbert": (
        transformers.DistilBertConfig,
        transformers.DistilBertModel,
        dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128),
        6,
    ),
}


FAMILIES = {**EXTRA, **ENCODERS}


def make_extra(family: str) -> nn.Module:
    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    return build_model(config_cls, model_cls, kwargs)


@pytest.mark.parametrize("family", sorted(EXTRA) + sorted(ENCODERS))
def test_built_in_targets_are_every_block_linear(family: str) -> None:
    model = make_extra(family)
    assert model.config.model_type in BLOCK_LINEARS
    names = find_targets(model)
    per_block, blocks = FAMILIES[family][3], model.config.num_hidden_layers
    assert len(names) == per_block * blocks
    assert all(re.search(r"\.\d+\.", name) for name in names)  # inside the blocks
    assert not any("lm_head" in name or "embed" in name for name in names)


@pytest.mark.parametrize("family", sorted(EXTRA))
def test_default_path_round_trip_and_generate(family: str, tmp_path: Path) -> None:
    model = make_extra(family)
    windows = make_windows(8, 16)
    result = compress(model, Recipe(method="whiten", ratio=0.3), windows=windows)
    assert abs(result.targeted_ratio - 0.3) < 0.02
    out = rankwise.save(result, str(tmp_path / "out"))
    loaded = rankwise.load(out)
    ids = windows[:2]
    torch.testing.assert_close(model_output(loaded, ids), model_output(model, ids))
    generated = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize("family", sorted(EXTRA) + sorted(ENCODERS))
def test_block_by_block_grams_equal_a_whole_model_pass(family: str) -> None:
    """The block runner hands each block what the model's own forward does (masks, positions)."""
    model = make_extra(family)
    names = find_targets(model)
    windows = make_windows(4, 16)
    by_block = collect_grams(model, names, windows)
    whole = collect_grams_whole(model, names, windows, torch.float32)
    for name in names:
        torch.testing.assert_close(by_block[name].input_gram, whole[name].input_gram)


@pytest.mark.parametrize("family", ["llama", "gpt2", *sorted(EXTRA)])
def test_narrow_targets_gather_the_gram_of_their_outputs(family: str) -> None:
    """With output grams (whiten), a target narrower out than in whose input no sibling shares
    gets Y^T Y of its bias-free outputs, equal to W G W^T; every other target its input gram."""
    model = make_model(family) if family in ("llama", "gpt2") else make_extra(family)
    names = find_targets(model)
    windows = make_windows(4, 16)
    inputs_only = collect_grams(model, names, windows)
    mixed = collect_grams(model, names, windows, output_grams=True)
    for name in names:
        weight = linear_weight(model.get_submodule(name)).double()  # (out, in)
        stats, reference = mixed[name], inputs_only[name].input_gram
        if stats.output_gram is None:
            torch.testing.assert_close(stats.input_gram, reference)
            continue
        assert weight.shape[0] < weight.shape[1] and stats.input_gram is None
        expected = weight @ reference @ weight.T  # (out, out)
        torch.testing.assert_close(stats.output_gram, expected, rtol=1e-4, atol=1e-4)
    # SmolLM2's layout: only the MLP down projection (576 out of 1536 in) is narrow and unshared
    if family == "llama":
        narrow = {n for n in names if mixed[n].output_gram is not None}
        assert narrow == {n for n in names if n.endswith("mlp.down_proj")}


@pytest.mark.parametrize("family", sorted(EXTRA))
def test_output_fisher_equals_autograd(family: str) -> None:
    model = make_extra(family)
    assert_matches_reference(model, find_targets(model))


@pytest.mark.parametrize("family", sorted(EXTRA))
def test_weight_fisher_equals_autograd_and_drops_the_gradients(family: str) -> None:
    model = make_extra(family)
    names = find_targets(model)
    windows = make_windows(3, 12)
    fisher = collect_fisher(model, names, windows)
    expected = reference_fisher(model, names, windows)
    for name in names:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-9)
        assert model.get_submodule(name).weight.grad is None
    assert all(p.requires_grad for p in model.parameters())  # flags put back


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_encoder_round_trip(family: str, tmp_path: Path) -> None:
    model = make_extra(family)
    windows = make_windows(8, 16).clamp_min(2)  # no padding ids
    result = compress(model, Recipe(method="whiten", ratio=0.3), windows=windows)
    assert abs(result.targeted_ratio - 0.3) < 0.02
    loaded = rankwise.load(rankwise.save(result, str(tmp_path / "out")))
    assert type(loaded) is type(model)
    ids = windows[:2]
    torch.testing.assert_close(model_output(loaded, ids), model_output(model, ids))


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_an_encoder_config_naming_no_class_loads_as_a_bare_encoder(family: str) -> None:
    config = make_extra(family).config
    config.architectures = None
    assert model_class_for(config) is transformers.AutoModel
