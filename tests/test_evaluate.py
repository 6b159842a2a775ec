"""Perplexity under the protocol (exp of the mean NLL over every predicted token) and the tables."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CAUSAL, make_model, make_windows

from rankwise.evaluation import perplexity as evaluate
from rankwise.report.tables import fmt_ppl, human_bytes, layer_table, summary_table
from rankwise.storage.manifest import LayerEntry


def manual_perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits  # (count, seq, vocab)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1)
    )
    return float(nll.exp())


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_perplexity_is_exp_mean_nll(batch_size: int) -> None:
    model = make_model("llama")
    windows = make_windows(5, 12)
    advanced = []
    result = evaluate.perplexity(model, windows, batch_size=batch_size, advance=advanced.append)
    assert result.windows == 5 and result.tokens == 5 * 11
    assert result.perplexity == pytest.approx(manual_perplexity(model, windows), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll))
    assert sum(advanced) == 5


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("chunk", [3, 512])
def test_chunked_head_scores_equal_the_full_logits(family: str, chunk: int) -> None:
    model = make_model(family)
    windows = make_windows(3, 12)
    with torch.no_grad():
        nll = evaluate.window_nll(model, windows, chunk=chunk)
    assert evaluate._head(model) is not None  # every built-in family takes the chunked path
    assert nll.dtype == torch.float64
    assert float(nll.sum() / (3 * 11)) == pytest.approx(
        math.log(manual_perplexity(model, windows)), rel=1e-5
    )


def test_a_soft_capped_head_is_scored_like_the_model() -> None:
    model = make_model("gemma3", final_logit_softcapping=2.0)
    windows = make_windows(2, 10)
    with torch.no_grad():
        nll = evaluate.window_nll(model, windows, chunk=4)
    assert float(nll.sum() / 18) == pytest.approx(
        math.log(manual_perplexity(model, windows)), rel=1e-5
    )


def test_random_model_is_near_uniform() -> None:
    result = evaluate.perplexity(make_model("gpt2"), make_windows(2, 16))
    assert 64 < result.perplexity < 256  # vocabulary of 128, untrained


def test_a_nan_window_makes_the_perplexity_nan() -> None:
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = math.nan
    result = evaluate.perplexity(model, make_windows(2, 8))
    assert math.isnan(result.perplexity)


def test_report_formatting() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(2000) == "2.0 KB"  # decimal units, as the bench tables
    assert human_bytes(3 * 10**9) == "3.00 GB"
    assert fmt_ppl(None) == "-"
    assert fmt_ppl(12.345) == "12.35"
    assert fmt_ppl(2.5e6) == "2.5e+06"


def test_tables_have_a_row_per_entry() -> None:
    rows = [
        {"name": "dense", "params": 1000, "bytes": 4000, "perplexity": {"bbc": 10.0}},
        {
            "name": "whiten 0.2",
            "params": 800,
            "bytes": 3200,
            "perplexity": {"bbc": 12.0},
            "targeted_ratio": 0.2,
            "model_ratio": 0.15,
            "seconds": 3.0,
        },
    ]
    assert summary_table(rows, ["bbc"]).row_count == 2
    layers = [
        LayerEntry(name="a", out=4, **{"in": 8}, rank=2, rel_error=0.1, est_loss=0.5),
        LayerEntry(name="b", out=4, **{"in": 8}, rank=None, rel_error=0.0, est_loss=0.0),
    ]
    table = layer_table(layers)
    assert table.row_count == 2
    assert list(table.columns[2].cells) == ["2", "dense"]
    assert list(table.columns[3].cells) == ["75.0%", "100.0%"]
    assert list(table.columns[5].cells) == ["0.5", "0"]
    assert table.columns[1].footer == "64 params" and table.columns[3].footer == "87.5%"
    plain = layer_table([LayerEntry(name="a", out=4, **{"in": 8}, rank=2)])
    assert len(plain.columns) == 5  # no estimated-loss column without importance allocation
