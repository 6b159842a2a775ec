"""The fast path: merge policy (pure decision + measured costs), merged output equality, bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_windows, model_output
from torch import nn
from typer.testing import CliRunner

import rankwise
from rankwise.cli.app import app
from rankwise.core.recipe import Recipe
from rankwise.evaluation.speed import WORKLOADS, BenchError, Workload, round_order, workload_macs
from rankwise.model.layers import LowRankLinear, SparseLowRankLinear
from rankwise.storage.merge import (
    CostTable,
    MergePolicyError,
    ShapeCosts,
    apply_merge_policy,
    decide,
    factored_shapes,
    grid_ranks,
    keep_factored,
    measure_costs,
    plan_merges,
    sparse_costs,
)

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def compressed(ratio: float = 0.5) -> nn.Module:
    recipe = Recipe(ratio=ratio, method="svd", allocation="uniform", calib_dtype="float32")
    return rankwise.compress(make_model("llama"), recipe, windows=make_windows()).model


def saved(tmp_path: Path, ratio: float = 0.5) -> str:
    recipe = Recipe(ratio=ratio, method="svd", allocation="uniform", calib_dtype="float32")
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows())
    return rankwise.save(result, str(tmp_path / "model"))


def low_rank_count(model: nn.Module) -> int:
    return sum(isinstance(m, LowRankLinear) for m in model.modules())


# --- the decision: a pure function of times --------------------------------------------------


def synthetic_cost(launch: float, per_mac: float, small_penalty: float):
    """Dense: one launch; factorized: two launches, and a slowdown for thin products."""

    def cost(out: int, inp: int, rank: int, tokens: int) -> tuple[float, float]:
        dense = launch + per_mac * tokens * out * inp
        thin = 1.0 + small_penalty / rank  # small ranks run below peak
        factored = 2 * launch + per_mac * tokens * rank * (out + inp) * thin
        return dense, factored

    return cost


@pytest.mark.parametrize("launch", [0.0, 1e-6, 1e-4])
@pytest.mark.parametrize("penalty", [0.0, 8.0, 64.0])
def test_policy_never_picks_the_slower_form(launch: float, penalty: float) -> None:
    cost = synthetic_cost(launch, 1e-9, penalty)
    shapes = {
        f"{out}x{inp}r{rank}": (out, inp, rank)
        for out, inp in [(64, 64), (576, 1536), (192, 576)]
        for rank in (1, 4, 16, 32, 100, 140, 190, 300, 419)
    }
    tokens = (1, 8, 512)
    keep = decide(shapes, cost, tokens)
    for name, (out, inp, rank) in shapes.items():
        times = [cost(out, inp, rank, t) for t in tokens]
        if keep[name]:
            assert all(f <= d for d, f in times), name
        else:
            assert any(f > d for d, f in times), name
    # the synthetic model has both outcomes, so the check above is not vacuous
    if launch < 1e-4:
        assert any(keep.values()) and not all(keep.values())


def test_a_sparse_residuals_time_counts_against_its_factors() -> None:
    """Factors alone are faster, but with the CSR product's time added they are not at one
    workload: the layer must be merged. A layer without a residual keeps its factors."""

    def cost(out: int, inp: int, rank: int, tokens: int) -> tuple[float, float]:
        return 1.0, 0.8

    shapes = {"sparse": (64, 64, 8), "plain": (64, 64, 8)}
    extra = {"sparse": {1: 0.1, 8: 0.1, 512: 0.3}}
    assert decide(shapes, cost, (1, 8, 512), extra) == {"sparse": False, "plain": True}
    assert decide(shapes, cost, (1, 8), extra) == {"sparse": True, "plain": True}


def test_sparse_costs_time_every_sparse_layer_at_every_workload() -> None:
    from test_sparse import compress_tiny

    model = compress_tiny("sparse").model
    sparse = {n for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear) and m.nnz}
    costs = sparse_costs(model, tokens=(1, 8))
    assert sparse and set(costs) == sparse
    assert all(set(c) == {1, 8} and all(v > 0 for v in c.values()) for c in costs.values())


def test_keep_factored_needs_every_workload() -> None:
    assert keep_factored([(2.0, 1.0), (2.0, 2.0)])
    assert not keep_factored([(2.0, 1.0), (1.0, 1.5)])  # faster at prefill, slower at decode
    assert keep_factored([])


def test_cost_table_interpolates_between_measured_ranks() -> None:
    entry = ShapeCosts(dense=5.0, ranks=(10, 20, 40), factored=(1.0, 3.0, 7.0))
    assert entry.factored_at(10) == 1.0 and entry.factored_at(40) == 7.0
    assert entry.factored_at(15) == pytest.approx(2.0)
    assert entry.factored_at(30) == pytest.approx(5.0)
    assert entry.factored_at(1) == 1.0 and entry.factored_at(99) == 7.0
    table = CostTable({(8, 4, 1): entry})
    assert table(8, 4, 30, 1) == (5.0, pytest.approx(5.0))


def test_grid_keeps_extremes_and_few_points() -> None:
    assert grid_ranks([5, 3, 3]) == (3, 5)
    grid = grid_ranks(range(1, 101), points=5)
    assert grid[0] == 1 and grid[-1] == 100 and len(grid) == 5


def test_measure_costs_covers_every_shape_and_workload() -> None:
    table = measure_costs([(32, 16, 4), (32, 16, 8), (16, 32, 4)], tokens=(1, 8))
    assert set(table.costs) == {(32, 16, 1), (32, 16, 8), (16, 32, 1), (16, 32, 8)}
    assert table.costs[(32, 16, 1)].ranks == (4, 8)
    dense, factored = table(32, 16, 6, 8)
    assert dense > 0 and factored > 0


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(MergePolicyError, match="auto, never, always"):
        plan_merges(compressed(), "sometimes")
    with pytest.raises(ValueError):
        Recipe(merge_policy="sometimes")


# --- merged and plain paths compute the same function -----------------------------------------


def test_merged_model_matches_factorized() -> None:
    model = compressed()
    expected = model_output(model, IDS)
    assert low_rank_count(model) == 14
    merged = apply_merge_policy(model, "always")
    assert len(merged) == 14 and low_rank_count(model) == 0
    torch.testing.assert_close(model_output(model, IDS), expected, rtol=1e-5, atol=1e-5)


def test_auto_policy_follows_the_cost_function() -> None:
    model = compressed()
    expected = model_output(model, IDS)

    # a cost under which only the MLP's factors pay
    def cost(out: int, inp: int, rank: int, tokens: int) -> tuple[float, float]:
        return (1.0, 0.5) if max(out, inp) == 128 else (1.0, 2.0)

    shapes = factored_shapes(model)
    merged = apply_merge_policy(model, "auto", cost)
    assert sorted(merged) == sorted(n for n, s in shapes.items() if max(s[:2]) < 128)
    assert all("mlp" in n for n, m in model.named_modules() if isinstance(m, LowRankLinear))
    torch.testing.assert_close(model_output(model, IDS), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["never", "always", "auto"])
def test_load_applies_the_policy_and_generates_the_same(policy: str, tmp_path: Path) -> None:
    out = saved(tmp_path)
    plain = rankwise.load(out, merge_policy="never")
    model = rankwise.load(out, merge_policy=policy)
    counts = {"never": 14, "always": 0}
    if policy in counts:
        assert low_rank_count(model) == counts[policy]
    prompt = IDS[:1, :4]
    with torch.no_grad():
        expected = plain.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        got = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_saved_recipe_policy_is_the_load_default(tmp_path: Path) -> None:
    recipe = Recipe(ratio=0.5, method="svd", allocation="uniform", merge_policy="always")
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows())
    out = rankwise.save(result, str(tmp_path / "model"))
    assert low_rank_count(rankwise.load(out)) == 0
    assert low_rank_count(rankwise.load(out, merge_policy="never")) == 14


def test_the_merge_decision_is_made_once_at_save_and_every_load_is_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A noisy machine: every timing a coin flip. Saved once, the directory still loads as one
    network, however often (the decision taken at save time is stored, not re-timed)."""
    import random

    import rankwise.storage.merge as policy

    coin = random.Random(0)

    def noisy_costs(shapes: object, *args: object, **kwargs: object) -> policy.CostFn:
        return lambda out, inp, rank, tokens: (1.0, 0.5 if coin.random() < 0.85 else 2.0)

    monkeypatch.setattr(policy, "measure_costs", noisy_costs)
    recipe = Recipe(ratio=0.5, method="svd", allocation="uniform", calib_dtype="float32")
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows())
    out = rankwise.save(result, str(tmp_path / "model"))
    stored = json.loads((Path(out) / "config.json").read_text())["rankwise"]["merge"]
    assert stored["policy"] == "auto" and "CPU capability" in stored["machine"]
    first, second = rankwise.load(out), rankwise.load(out)
    structure = [(n, type(m).__name__) for n, m in first.named_modules()]
    assert structure == [(n, type(m).__name__) for n, m in second.named_modules()]
    assert 0 < low_rank_count(first) < 14  # the coin merged some layers, not all
    assert sorted(stored["merged"]) == sorted(
        n for n, m in first.named_modules() if "proj" in n and isinstance(m, nn.Linear)
    )
    torch.testing.assert_close(model_output(first, IDS), model_output(second, IDS))


def test_a_directory_without_a_stored_decision_keeps_every_factor(tmp_path: Path) -> None:
    out = Path(saved(tmp_path))
    config = json.loads((out / "config.json").read_text())
    del config["rankwise"]["merge"]  # as the previous format wrote it
    (out / "config.json").write_text(json.dumps(config))
    assert low_rank_count(rankwise.load(out)) == 14


# --- bench ------------------------------------------------------------------------------------


def test_macs_shrink_with_factors_and_count_the_head_once_per_logit() -> None:
    dense, small = make_model("llama"), compressed()
    for work in WORKLOADS:
        assert workload_macs(small, work) < workload_macs(dense, work)
    prefill = Workload("p", "prefill", 1, 4)
    decode = Workload("d", "decode", 1, 4, prompt=1)  # 4 single-token forwards, 4 logits
    assert workload_macs(dense, prefill) == workload_macs(dense, decode)


def test_runs_alternate_in_both_orders() -> None:
    orders = [round_order(["model", "reference"], r) for r in range(4)]
    assert orders == [["model", "reference"], ["reference", "model"]] * 2


def test_bench_command_writes_json(tmp_path: Path) -> None:
    out = saved(tmp_path)
    dense = tmp_path / "dense"
    make_model("llama").save_pretrained(dense)
    figures = tmp_path / "speed.json"
    args = ["bench", out, "--vs", str(dense), "--repeats", "1", "--threads", "1"]
    result = CliRunner().invoke(app, [*args, "--json", str(figures)])
    assert result.exit_code == 0, result.output
    data = json.loads(figures.read_text())
    assert [row["workload"] for row in data["rows"]] == [w.name for w in WORKLOADS]
    for row in data["rows"]:
        assert row["model_tps"] > 0 and row["reference_tps"] > 0 and row["bound"] > 1.0
    assert "prefill 1x512" in result.output
    memory = data["memory_mb"]
    assert memory["model"]["peak_mb"] > 0 and memory["reference"]["peak_mb"] > 0


def test_bench_runs_only_the_named_workloads(tmp_path: Path) -> None:
    out = saved(tmp_path)
    figures = tmp_path / "speed.json"
    args = ["bench", out, "--vs", out, "--repeats", "1", "--threads", "1", "--no-memory"]
    result = CliRunner().invoke(app, [*args, "--only", "decode 1x64", "--json", str(figures)])
    assert result.exit_code == 0, result.output
    rows = json.loads(figures.read_text())["rows"]
    assert [row["workload"] for row in rows] == ["decode 1x64"] and rows[0]["bound"] == 1.0
    bad = CliRunner().invoke(app, [*args, "--only", "decode 2x2"])
    assert isinstance(bad.exception, BenchError) and "decode 1x64" in str(bad.exception)
