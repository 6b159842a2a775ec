"""Sequential calibration in stages: the groups a probe finds, replays that change nothing, and
the fallback for a block that cannot be staged."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model, make_windows
from torch import nn

from rankwise.calibration import staged
from rankwise.calibration.blocks import BlockInputs, capture_inputs, find_blocks, forward_all
from rankwise.calibration.grams import GramCollector, narrow_targets
from rankwise.methods import LayerStats
from rankwise.model.targets import find_targets


def first_block(
    family: str, count: int = 4, **changes: object
) -> tuple[nn.Module, list[str], BlockInputs]:
    model = make_model(family, **changes)
    names = find_targets(model)
    list_name, blocks = find_blocks(model, names)
    inputs = capture_inputs(model, blocks[0], make_windows(count, 12), 2, torch.float32)
    prefix = f"{list_name}.0."
    return blocks[0], [n[len(prefix) :] for n in names if n.startswith(prefix)], inputs


def probe_first_batch(
    block: nn.Module, local: list[str], inputs: BlockInputs
) -> list[staged.Group] | None:
    with torch.inference_mode():
        return staged.probe_groups(
            block, local, (inputs.hidden[0], inputs.args[0], inputs.kwargs[0])
        )


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (
            "llama",
            [
                (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], None),
                (["self_attn.o_proj"], "self_attn"),
                (["mlp.gate_proj", "mlp.up_proj"], None),
                (["mlp.down_proj"], "mlp"),
            ],
        ),
        (
            "gpt2",
            [
                (["attn.c_attn"], None),
                (["attn.c_proj"], "attn"),
                (["mlp.c_fc"], None),
                (["mlp.c_proj"], "mlp"),
            ],
        ),
        (
            "bert",  # the attention output's dense layer is followed by its norm: no parent
            [
                (["attention.self.query", "attention.self.key", "attention.self.value"], None),
                (["attention.output.dense"], None),
                (["intermediate.dense"], None),
                (["output.dense"], None),
            ],
        ),
    ],
)
def test_the_probe_finds_groups_in_call_order_and_the_modules_returning_their_output(
    family: str, expected: list
) -> None:
    block, local, inputs = first_block(family)
    groups = probe_first_batch(block, local, inputs)
    assert [(g.names, g.parent) for g in groups] == expected


class Twice(nn.Module):
    """A block that calls one target twice: it cannot be staged."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner(self.inner(hidden))


def test_a_target_called_twice_cannot_be_staged() -> None:
    with torch.inference_mode():
        assert staged.probe_groups(Twice(), ["inner"], (torch.randn(2, 8), (), {})) is None


@pytest.mark.parametrize(
    ("family", "changes"),
    [("llama", {}), ("gpt2", {}), ("gemma3", {}), ("gemma3", {"head_dim": 32})],
)
def test_stages_that_change_nothing_give_the_dense_grams_and_outputs(
    family: str, changes: dict
) -> None:
    """With no factorization, the stops, kept inputs and replays must reproduce the dense block:
    every group's statistics and the block's outputs."""
    block, local, inputs = first_block(family, **changes)
    copy_ = copy.deepcopy(block)
    narrow = narrow_targets(copy_, local, True)
    collector = GramCollector(copy_, local, narrow)
    with torch.inference_mode():
        dense_outputs = forward_all(copy_, inputs.hidden, inputs)
    collector.remove()
    dense = collector.stats()
    seen: dict[str, LayerStats] = {}

    def record(names: list[str], stats: dict[str, LayerStats]) -> None:
        seen.update(stats)

    job = staged.BlockJob(block, "", local, inputs.hidden, inputs, torch.float32, record, True)
    outputs = staged.compress_block_in_stages(job)
    assert seen.keys() == set(local)
    for name in local:
        for field in ("input_gram", "output_gram"):
            expected, found = getattr(dense[name], field), getattr(seen[name], field)
            assert (expected is None) == (found is None), (name, field)
            if expected is not None:
                torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-8)
        assert seen[name].tokens == dense[name].tokens
    for found, expected in zip(outputs, dense_outputs, strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "changes"),
    [("llama", {}), ("gemma3", {"head_dim": 32})],  # gemma3: o_proj reads 128, writes 64
)
def test_the_attention_runs_once_per_stage_pass_of_its_output_projection(
    monkeypatch: pytest.MonkeyPatch, family: str, changes: dict
) -> None:
    """What staging is for: the attention of a block runs for the probe's batch and in the
    stage of o_proj; later stages and the outputs see its replay, also where o_proj is wider in
    than out."""
    block, local, inputs = first_block(family, **changes)
    calls: list[int] = []
    cast_copy = staged.cast_copy

    def counting_copy(
        module: nn.Module, dtype: torch.dtype, device: torch.device | None = None
    ) -> nn.Module:
        made = cast_copy(module, dtype, device)
        if hasattr(made, "self_attn"):
            made.self_attn.register_forward_hook(lambda *_: calls.append(1))
        return made

    monkeypatch.setattr(staged, "cast_copy", counting_copy)
    job = staged.BlockJob(
        block, "", local, inputs.hidden, inputs, torch.float32, lambda *_: None, True
    )
    staged.compress_block_in_stages(job)
    assert len(calls) == 1 + len(inputs.hidden)  # the probe's batch, then the o_proj stage


class TwiceModel(nn.Module):
    """Blocks in one list, each calling its target twice."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([Twice(), Twice()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def test_a_block_that_cannot_be_staged_is_gathered_dense_then_recomputed_compressed() -> None:
    """The fallback: block 1's gram comes from block 0 as compressed (here: zeroed)."""
    model = TwiceModel()
    windows = torch.randint(0, 16, (4, 6))
    seen: dict[str, LayerStats] = {}

    def zero(names: list[str], stats: dict[str, LayerStats]) -> None:
        seen.update(stats)
        for name in names:
            model.get_submodule(name).weight.data.zero_()
            model.get_submodule(name).bias.data.zero_()

    names = ["layers.0.inner", "layers.1.inner"]
    bias = model.layers[1].inner.bias.detach().double().clone()
    staged.compress_sequential(model, names, windows, torch.float32, zero)
    assert list(seen) == names
    assert seen["layers.0.inner"].tokens == 2 * windows.numel()  # called twice per window
    # block 1 reads block 0's zeros, then its own bias: the gram of the compressed prefix
    expected = windows.numel() * torch.outer(bias, bias)
    torch.testing.assert_close(seen["layers.1.inner"].input_gram, expected, rtol=1e-5, atol=1e-6)


def test_the_last_group_takes_its_gram_in_the_stage_before_it() -> None:
    """down_proj's gram comes from the dense gate/up (better on Gemma 3 and SmolLM2, one pass
    fewer): the last two groups become one, with no parent to replay."""
    block, local, inputs = first_block("llama")
    groups = probe_first_batch(block, local, inputs)
    joined = staged.join_last(groups)
    assert [(g.names, g.parent) for g in joined] == [
        (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], None),
        (["self_attn.o_proj"], "self_attn"),
        (["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], None),
    ]
    assert staged.join_last(groups[:1]) == groups[:1]
