"""Output Fisher, block by block or through the whole model, equals an autograd reference; the
sliced head + loss gives the model's own loss and gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, make_windows

from rankwise.calibration import fisher
from rankwise.calibration.fisher import collect_output_fisher
from rankwise.calibration.lm_loss import final_head, reproduces_loss, sliced_loss
from rankwise.model.targets import find_targets


def reference_output_fisher(model: torch.nn.Module, names: list[str], windows: torch.Tensor):
    """Mean over tokens of (d summed window loss / d output)^2, one autograd.grad per window."""
    totals = {n: 0.0 for n in names}
    outputs: dict[str, torch.Tensor] = {}
    for window in windows:
        handles = [
            model.get_submodule(n).register_forward_hook(
                lambda m, a, out, n=n: outputs.__setitem__(n, out)
            )
            for n in names
        ]
        batch = window[None]
        embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=batch).loss * (batch.shape[1] - 1)
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
        for handle in handles:
            handle.remove()
        for name, grad in zip(names, grads, strict=True):
            totals[name] = totals[name] + grad.reshape(-1, grad.shape[-1]).double().square().sum(0)
    return {n: total / windows.numel() for n, total in totals.items()}


def assert_matches_reference(model: torch.nn.Module, names: list[str], batch_size: int = 1):
    windows = make_windows(3, 12)
    found = collect_output_fisher(model, names, windows, torch.float32, batch_size=batch_size)
    expected = reference_output_fisher(model, names, windows)
    assert found.keys() == expected.keys()
    for name in names:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-12)


def pass_kind(model: torch.nn.Module, names: list[str]) -> type:
    return type(fisher._backward_pass(model, names, make_windows(2, 12), 1, torch.float32))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_output_fisher_block_by_block_is_mean_squared_output_gradient(family: str) -> None:
    model = make_model(family)
    names = find_targets(model)
    assert pass_kind(model, names) is fisher._BlockByBlock
    assert_matches_reference(model, names)
    assert all(p.requires_grad for p in model.parameters())  # a private frozen copy was used


def test_output_fisher_of_batches_equals_one_window_at_a_time() -> None:
    model = make_model("llama")
    assert_matches_reference(model, find_targets(model), batch_size=2)


def test_output_fisher_of_late_targets_stops_the_backward_at_their_block() -> None:
    model = make_model("llama")
    names = [n for n in find_targets(model) if ".layers.1." in n]
    assert_matches_reference(model, names)


def test_soft_capped_logits_are_rebuilt_by_the_head() -> None:
    model = make_model("gemma3", final_logit_softcapping=0.05)
    names = find_targets(model)
    assert pass_kind(model, names) is fisher._BlockByBlock
    assert_matches_reference(model, names)


def test_logits_the_head_cannot_rebuild_take_the_whole_model() -> None:
    """A soft-cap in the config that the model class never applies: the rebuilt head's loss
    differs from the model's, so the model's own forward and loss are differentiated."""
    model = make_model("llama")
    model.config.final_logit_softcapping = 0.05
    names = find_targets(model)
    assert pass_kind(model, names) is fisher.WholeModelBackward
    assert_matches_reference(model, names)


def test_targets_outside_the_blocks_take_the_whole_model() -> None:
    model = make_model("llama")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    names = ["lm_head", "model.layers.0.mlp.down_proj"]
    assert pass_kind(model, names) is fisher.WholeModelBackward
    assert_matches_reference(model, names)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("windows", [1, 3])
def test_sliced_loss_and_gradient_equal_the_models(family: str, windows: int) -> None:
    model = make_model(family)
    tokens = make_windows(windows, 200)[:, : 64 if family == "gpt2" else 200]
    _, blocks = fisher.find_blocks(model, find_targets(model))
    last: list[torch.Tensor] = []
    blocks[-1].register_forward_hook(
        lambda m, a, out: last.append(out[0] if isinstance(out, tuple) else out)
    )
    loss = model(input_ids=tokens, labels=tokens).loss * tokens.shape[0] * (tokens.shape[1] - 1)
    (expected,) = torch.autograd.grad(loss, [last[-1]])

    found, grad = sliced_loss(final_head(model), last[-1].detach().requires_grad_(True), tokens)

    assert found == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_the_rebuilt_head_reproduces_plain_models_and_detects_unknown_logit_changes() -> None:
    model = make_model("llama")
    _, blocks = fisher.find_blocks(model, find_targets(model))
    tokens = make_windows(1, 16)
    assert reproduces_loss(model, blocks[-1], final_head(model), tokens)
    model.config.final_logit_softcapping = 0.05  # the head applies it, the model does not
    assert not reproduces_loss(model, blocks[-1], final_head(model), tokens)
