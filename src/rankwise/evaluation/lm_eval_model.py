"""lm-eval's own command line on rankwise directories: a model type `rankwise` for its registry.

    python -m rankwise.evaluation.lm_eval_model run --model rankwise --model_args pretrained=DIR \
        --tasks rt_sentiment --include_path "$(rankwise tasks --path)" --limit 100

`--model hf` would build the dense architecture from config.json and silently leave the
factorized layers at random initialization; this type loads through `rankwise.load_model`
(compressed directories, `default`, `minilm`, GGUF) and is otherwise lm-eval's HFLM. Importing
this module registers the type (lm-eval's documented extension point); `import rankwise` does not.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from rankwise.core.errors import TaskError
from rankwise.storage.sources import load_model


@register_model("rankwise")
class RankwiseLM(HFLM):
    """HFLM over the model and tokenizer rankwise loads from `pretrained` (a spec or a DIR)."""

    def __init__(self, pretrained: str, **kwargs: object) -> None:
        loaded = load_model(str(pretrained))
        if loaded.tokenizer is None:
            raise TaskError(f"{pretrained} holds no tokenizer: lm-eval needs one")
        kwargs.pop("tokenizer", None)
        kwargs.setdefault("device", "cpu")
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **kwargs)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
