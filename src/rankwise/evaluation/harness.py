"""lm-evaluation-harness on a loaded model: rankwise's offline tasks (or lm-eval's own).

`HFLM(pretrained=model)` takes the very object `rankwise.load` returns: LowRankLinear modules
are ordinary nn.Modules, so lm-eval needs no adapter beyond the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from rankwise.core.errors import TaskError
from rankwise.evaluation.encoder import is_encoder
from rankwise.evaluation.tasks import TAG, TASKS, include_path

# Headline metric per output type: accuracy for choices, word perplexity for streams.
HEADLINE = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")


@dataclass
class TaskResults:
    """lm-eval's results per task, the table it prints, and the headline figures."""

    results: dict[str, dict[str, object]]
    table: str
    n_samples: dict[str, object] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict[str, float]]:
        """{task: {metric: value}} without lm-eval's filter suffix (',none') or stderr."""
        out: dict[str, dict[str, float]] = {}
        for task, values in self.results.items():
            row = {}
            for key, value in values.items():
                name = key.split(",")[0]
                if name in HEADLINE and isinstance(value, int | float):
                    row[name] = float(value)
            out[task] = row
        return out


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError(
            "lm-evaluation-harness is not installed: pip install 'rankwise[eval]'"
        ) from None


def task_manager(tasks: list[str], builtin: bool | None = None) -> object:
    """rankwise's configs; lm-eval's built-in index (thousands of YAMLs, ~10 s) only when a task
    is not one of ours, or `builtin` says so."""
    from lm_eval.tasks import TaskManager

    if builtin is None:
        builtin = any(t not in set(TASKS) | {TAG} for t in tasks)
    manager = TaskManager(include_path=str(include_path()), include_defaults=builtin)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise TaskError(f"unknown task {unknown[0]!r}; rankwise ships {', '.join(TASKS)}")
    return manager


def run_tasks(
    model: nn.Module,
    tokenizer: object,
    tasks: list[str],
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
) -> TaskResults:
    """`lm_eval.simple_evaluate` on HFLM(pretrained=model) with rankwise's task configs."""
    _require_lm_eval()
    if tokenizer is None:
        raise TaskError("lm-eval needs the model's tokenizer; the directory holds none")
    if not tasks:
        raise TaskError(f"no task given; rankwise ships {', '.join(TASKS)}")
    if is_encoder(model):
        raise TaskError(
            "lm-eval tasks score text with a causal LM; for an encoder run eval without --tasks"
        )
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    manager = task_manager(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    output = simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )
    return TaskResults(
        results=output["results"], table=make_table(output), n_samples=output.get("n-samples", {})
    )
