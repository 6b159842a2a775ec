"""Functions the task YAMLs name with `!function rankwise.evaluation.tasks.hooks.NAME`.

lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)` instead of downloading from a hub,
so the tasks run offline (HF_DATASETS_OFFLINE=1) on text the installed packages ship.
"""

from __future__ import annotations

import re

from rankwise.evaluation.tasks.docs import TASK_DOCS


def _dataset(task: str) -> object:
    import datasets

    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(docs) for split, docs in TASK_DOCS[task]().items()}
    )


def rt_sentiment(**_: object) -> object:
    return _dataset("rt_sentiment")


def bbc_topic(**_: object) -> object:
    return _dataset("bbc_topic")


def bbc_perplexity(**_: object) -> object:
    return _dataset("bbc_perplexity")


def wiki_perplexity(**_: object) -> object:
    return _dataset("wiki_perplexity")


def perplexity_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    """Word and byte perplexity of a document (lm-eval aggregates the (loglik, count) pairs)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    size = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, size),
        "bits_per_byte": (loglikelihood, size),
    }
