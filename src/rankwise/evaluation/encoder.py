"""Measures for sentence encoders (BERT family), which have no LM loss to take a perplexity of.

- Fidelity: cosine similarity between the compressed and the original model's sentence
  embeddings (mean pooled over real tokens, L2-normalized, as sentence-transformers'
  all-MiniLM-L6-v2 pipeline does) on held-out BBC sentences.
- Usefulness: accuracy of a logistic-regression probe on the 5 BBC topics, trained on embeddings
  of calibration-split articles and tested on the held-out ones. Fidelity alone can hide a
  uniform drift that leaves the classes apart; the probe measures what a user would build.
The regression is a few lines of torch (L-BFGS), so no scikit-learn is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.calibration.lm_loss import has_lm_head
from rankwise.core.errors import RankwiseError
from rankwise.data import corpora

SENTENCE_TOKENS = 128
ARTICLE_TOKENS = 128  # headline and first paragraph: enough for the topic, half the cost of 256
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def is_encoder(model: nn.Module) -> bool:
    """A bare encoder: hidden states out, no head predicting tokens."""
    config = getattr(model, "config", None)
    return not has_lm_head(model) and not getattr(config, "is_encoder_decoder", False)


def sentence_embeddings(
    model: nn.Module,
    tokenizer: object,
    texts: list[str],
    max_tokens: int = SENTENCE_TOKENS,
    batch_size: int = 32,
) -> torch.Tensor:
    """Mean-pooled, L2-normalized embeddings of `texts`. (len(texts), hidden)"""
    if tokenizer is None:
        raise RankwiseError("sentence embeddings need the model's tokenizer; none was found")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_tokens = min(max_tokens, positions or max_tokens)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            hidden = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state  # (batch, seq, hidden)
            out.append(mean_pool(hidden.float(), batch["attention_mask"]))
    return F.normalize(torch.cat(out), dim=-1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of each row (padding excluded). (batch, hidden)"""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity of two (n, hidden) embedding matrices."""
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def logistic_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    l2: float = 1e-3,
    steps: int = 100,
) -> float:
    """Test accuracy of multinomial logistic regression fit on (train_x, train_y).

    Features are standardized with the training statistics; L2 on the weights keeps the fit
    unique when classes separate perfectly (they nearly do on BBC topics)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)  # (hidden,)
    xs = ((train_x - mean) / std).double()  # (n_train, hidden)
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(xs.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(xs @ weight + bias, train_y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        logits = ((test_x - mean) / std).double() @ weight + bias  # (n_test, classes)
    return float((logits.argmax(-1) == test_y).double().mean())


def held_out_sentences(count: int = 512, min_words: int = 5) -> list[str]:
    """The first `count` sentences of the held-out BBC articles (index % 10 == 0)."""
    sentences = []
    for i, (_, text) in enumerate(corpora.bbc_articles()):
        if i % 10:
            continue
        for paragraph in text.split("\n"):
            for sentence in _SENTENCE_END.split(paragraph.strip()):
                if len(sentence.split()) >= min_words:
                    sentences.append(sentence)
                    if len(sentences) == count:
                        return sentences
    return sentences


def topic_split(held_out: bool, per_topic: int | None = None) -> tuple[list[str], torch.Tensor]:
    """BBC articles and topic labels of one split; `per_topic` spreads a cap evenly."""
    topics = sorted({topic for topic, _ in corpora.bbc_articles()})
    chosen = [
        (topic, text)
        for i, (topic, text) in enumerate(corpora.bbc_articles())
        if (i % 10 == 0) == held_out
    ]
    if per_topic is not None:
        capped = []
        for topic in topics:
            of_topic = [item for item in chosen if item[0] == topic]
            step = max(1, len(of_topic) // per_topic)
            capped += of_topic[::step][:per_topic]
        chosen = capped
    labels = torch.tensor([topics.index(topic) for topic, _ in chosen])
    return [text for _, text in chosen], labels


@dataclass
class EncoderTexts:
    """The texts every encoder is measured on (built once, shared by model and reference)."""

    sentences: list[str]
    train: list[str]
    train_labels: torch.Tensor
    test: list[str]
    test_labels: torch.Tensor

    @classmethod
    def bbc(cls, sentences: int = 512, train_per_topic: int = 60) -> EncoderTexts:
        train, train_labels = topic_split(held_out=False, per_topic=train_per_topic)
        test, test_labels = topic_split(held_out=True)
        return cls(held_out_sentences(sentences), train, train_labels, test, test_labels)


def probe_accuracy(model: nn.Module, tokenizer: object, texts: EncoderTexts) -> float:
    train = sentence_embeddings(model, tokenizer, texts.train, ARTICLE_TOKENS)
    test = sentence_embeddings(model, tokenizer, texts.test, ARTICLE_TOKENS)
    return logistic_probe(train, texts.train_labels, test, texts.test_labels)


def encoder_figures(
    model: nn.Module,
    tokenizer: object,
    texts: EncoderTexts,
    reference: nn.Module | None = None,
    reference_probe: float | None = None,
) -> dict[str, float]:
    """cosine to `reference` (1.0 without one), probe accuracy of the model and the reference."""
    figures = {"probe_accuracy": probe_accuracy(model, tokenizer, texts)}
    if reference is None:
        figures["cosine"] = 1.0
        figures["reference_probe_accuracy"] = figures["probe_accuracy"]
        return figures
    ours = sentence_embeddings(model, tokenizer, texts.sentences)
    theirs = sentence_embeddings(reference, tokenizer, texts.sentences)
    figures["cosine"] = mean_cosine(ours, theirs)
    if reference_probe is None:
        reference_probe = probe_accuracy(reference, tokenizer, texts)
    figures["reference_probe_accuracy"] = reference_probe
    return figures
