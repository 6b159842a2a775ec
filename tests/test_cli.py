"""The `rankwise` command, run as a user runs it (a subprocess), and the recipe it maps onto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, model_output, saved_targets, word_text, word_tokenizer

import rankwise
from rankwise.cli.flags import YAML_ONLY, recipe_command, recipe_flags, recipe_from_flags, split
from rankwise.core.errors import RatioError, RecipeError
from rankwise.core.recipe import LayerOverride, Recipe
from rankwise.model.layers import LowRankLinear


def cli(
    *args: str, cwd: Path, columns: int = 80, timeout: float = 120
) -> subprocess.CompletedProcess:
    # one thread: tiny models gain nothing from more, and OpenMP spinning under load costs 10x
    env = {**os.environ, "COLUMNS": str(columns), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rankwise", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


# --- bad input: exit 2, one line `error: ...`, nothing written --------------------------------


def test_bad_ratio(tmp_path: Path) -> None:
    result = cli("compress", "default", "--ratio", "1.5", "--out", "X", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "ratio" in lines[0] and "1.5" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "X").exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_model(tmp_path: Path) -> None:
    result = cli("compress", "/nonexistent", "--out", "X", cwd=tmp_path)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "/nonexistent" in lines[0]
    assert result.stderr.strip().splitlines()[-1] == lines[0]
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_before_loading(tmp_path: Path) -> None:
    existing = tmp_path / ("a-rather-long-directory-name-so-the-message-is-wider-than-40" * 2)
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    before = snapshot(tmp_path)
    # a narrow terminal must not wrap the message onto several lines
    result = cli("compress", "default", "--out", str(existing), cwd=tmp_path, columns=40)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "--overwrite" in lines[0] and str(existing) in lines[0]
    assert snapshot(tmp_path) == before


def test_output_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    before = snapshot(tmp_path)
    result = cli("compress", "/nonexistent", "--out", "plain/out", cwd=tmp_path)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "not a directory" in lines[0]  # checked before the model
    assert snapshot(tmp_path) == before


def test_usage_error_exits_2_without_traceback(tmp_path: Path) -> None:
    result = cli("compress", "default", "--out", "X", "--no-such-flag", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--no-such-flag" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_recipe_file_with_unknown_key(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("method: svd\nratoi: 0.3\n")
    result = cli("compress", "default", "--recipe", "r.yaml", "--out", "X", cwd=tmp_path)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "ratoi" in lines[0]
    assert not (tmp_path / "X").exists()


# --- working commands on tiny models ---------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compressed tiny llama with one dense layer, saved in-process."""
    model = make_model("llama")
    recipe = Recipe(
        method="svd",
        ratio=0.3,
        overrides=[LayerOverride(pattern=r"0\.self_attn\.k_proj", dense=True)],
    )
    out = tmp_path_factory.mktemp("inspect") / "tiny"
    rankwise.save(rankwise.compress(model, recipe), str(out))
    return out


def test_inspect_prints_the_layer_table(saved_tiny: Path, tmp_path: Path) -> None:
    result = cli("inspect", str(saved_tiny), cwd=tmp_path, columns=120)
    assert result.returncode == 0, result.stderr
    targets = saved_targets(saved_tiny)
    lines = [line for line in result.stdout.splitlines() if "model.layers." in line]
    rows = {line.split()[1]: line for line in lines}
    assert list(rows) == list(targets)  # one row per target, in the saved order
    for name, target in targets.items():
        cells = rows[name].replace("│", " ").split()
        assert cells[1] == f"{target['out']}x{target['in']}"
        assert cells[2] == ("dense" if target["rank"] is None else str(target["rank"]))
    assert rows["model.layers.0.self_attn.k_proj"].replace("│", " ").split()[3] == "100.0%"
    assert "method svd" in result.stdout and "requested ratio 0.3" in result.stdout


def test_inspect_refuses_a_plain_directory(tmp_path: Path) -> None:
    result = cli("inspect", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert len(error_lines(result)) == 1


def test_compress_and_eval_a_tiny_directory(tmp_path: Path) -> None:
    """compress DIR (whiten, calibration from a user file) then eval the result, via the CLI."""
    model = make_model("llama", max_position_embeddings=600)
    model.save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    (tmp_path / "calib.txt").write_text(word_text(200, seed=1))
    (tmp_path / "eval.txt").write_text(word_text(600, seed=2))

    result = cli(
        "compress", "dense", "--out", "small", "--method", "whiten", "--ratio", "0.4",
        "--calib", "calib.txt", "--samples", "4", "--seq-len", "32", "--calib-dtype", "float32",
        "--json", "figures.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["recipe"]["method"] == "whiten" and figures["recipe"]["ratio"] == 0.4
    assert 0.4 <= figures["compressed"]["targeted_ratio"] < 0.45
    assert figures["compressed"]["params"] < figures["dense"]["params"]
    loaded = rankwise.load_model(str(tmp_path / "small"))
    assert loaded.tokenizer is not None
    assert any(isinstance(m, LowRankLinear) for m in loaded.model.modules())
    recipe = Recipe.from_yaml(tmp_path / "small" / "recipe.yaml")
    assert recipe.calib == "calib.txt" and recipe.samples == 4 and recipe.model == "dense"

    result = cli(
        "eval", "small", "--windows", "1", "--streams", "eval.txt", "--json", "ppl.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "ppl.json").read_text())
    assert row["params"] == figures["compressed"]["params"]
    assert row["targeted_ratio"] == pytest.approx(figures["compressed"]["targeted_ratio"])
    ppl = row["perplexity"]["eval.txt"]
    assert 1.0 < ppl < float("inf")
    assert json.loads((tmp_path / "small" / "eval.json").read_text()) == row  # for the report
    ids = loaded.tokenizer(word_text(600, seed=2))["input_ids"][:512]
    logits = model_output(loaded.model, torch.tensor([ids]))
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]))
    assert ppl == pytest.approx(float(nll.exp()), rel=1e-4)


# --- recipes ----------------------------------------------------------------------------------


def full_recipe() -> Recipe:
    return Recipe(
        model="some/dir",
        method="fwsvd",
        ratio=0.35,
        allocation="uniform",
        targets=[r"layers\.\d+\.mlp"],
        ignore=["down_proj"],
        overrides=[
            LayerOverride(pattern="gate", ratio=0.5),
            LayerOverride(pattern="up", dense=True),
        ],
        calib="notes.jsonl",
        samples=16,
        seq_len=64,
        calib_dtype="float32",
        sequential=True,
        stats="stats.safetensors",
        eig_floor=1e-5,
        seed=7,
    )


def test_recipe_yaml_round_trip(tmp_path: Path) -> None:
    for recipe in (Recipe(), full_recipe()):
        path = tmp_path / "r.yaml"
        path.write_text(recipe.to_yaml())
        assert Recipe.from_yaml(path) == recipe


def test_empty_recipe_file_is_the_default(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("")
    assert Recipe.from_yaml(tmp_path / "r.yaml") == Recipe()


def test_flags_override_the_recipe() -> None:
    base = full_recipe()
    merged = base.merged(ratio=0.5, method="whiten", samples=None, targets=None, sequential=False)
    assert merged.ratio == 0.5 and merged.method == "whiten"
    assert merged.sequential is False  # False is a value, not "unset"
    assert merged.samples == 16 and merged.targets == base.targets  # None leaves the field alone
    assert merged.overrides == base.overrides
    assert base.ratio == 0.35  # the base is not changed
    assert base.merged() == base


def test_merged_flags_are_validated() -> None:
    with pytest.raises(RatioError):
        Recipe().merged(ratio=0.0)
    with pytest.raises(RecipeError):
        Recipe().merged(samples=0)
    with pytest.raises(RecipeError):
        Recipe().merged(calib_dtype="int8")


def test_comma_separated_flags() -> None:
    assert split(None) is None
    assert split("") is None
    assert split(r"q_proj$,k_proj$") == ["q_proj$", "k_proj$"]
    assert split("a,,b,") == ["a", "b"]


def compress_params() -> dict[str, object]:
    import typer

    from rankwise.cli.app import app

    command = typer.main.get_command(app).commands["compress"]
    return {param.name: param for param in command.params}


def test_every_recipe_field_is_a_flag_or_documented_as_yaml_only() -> None:
    flags = compress_params()
    missing = [f for f in Recipe.model_fields if f not in flags and f not in YAML_ONLY]
    assert missing == []
    page = (Path(__file__).parents[1] / "docs" / "recipe.md").read_text()
    assert all(f"| `{field}` |" in page for field in Recipe.model_fields)
    assert all(f"| `{field}` | YAML only" in page for field in YAML_ONLY)
    for flag in recipe_flags():  # the page names each flag as the command spells it
        dashed = flag.name.replace("_", "-")
        assert f"`--{dashed}" in page, dashed


def test_the_recipe_flags_are_the_recipe_fields() -> None:
    """Every scalar field is a flag with its description as help, and nothing else is: a new
    field needs no change to the CLI."""
    params = compress_params()
    generated = {flag.name for flag in recipe_flags()}
    expected = set(Recipe.model_fields) - set(YAML_ONLY) - {"model"}
    assert generated == expected | {"recover_steps", "recover_lr"}
    assert generated <= set(params)
    for name in expected:
        field = Recipe.model_fields[name]
        assert field.description and field.description in params[name].help
        assert params[name].default is None  # unset: the recipe's value stays
    assert params["sequential"].opts == ["--sequential"]
    assert params["sequential"].secondary_opts == ["--no-sequential"]
    assert "uniform | importance" in params["allocation"].help
    assert "comma-separated" in params["targets"].help


def test_a_new_recipe_field_becomes_a_flag() -> None:
    from typing import Literal

    import typer
    from pydantic import Field
    from typer.testing import CliRunner

    class Grown(Recipe):
        knob: int = Field(default=3, ge=1, description="a new knob")
        mode: Literal["a", "b"] = Field(default="a", description="a new choice")
        tags: list[str] = Field(default_factory=list, description="new regexes")
        fast: bool = Field(default=False, description="a new switch")

    seen: list[Recipe] = []
    app = typer.Typer()

    @app.command()
    @recipe_command(Grown)
    def run(model: str, **flags: object) -> None:
        seen.append(recipe_from_flags(Grown(), flags, model=model))

    @app.command()
    def other() -> None:  # two commands: `run` is then a subcommand, as in rankwise
        pass

    args = ["run", "m", "--knob", "5", "--mode", "b", "--tags", "x,y", "--fast", "--ratio", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen[-1] == Grown(model="m", knob=5, mode="b", tags=["x", "y"], fast=True, ratio=0.5)
    result = CliRunner().invoke(app, ["run", "m"])
    assert result.exit_code == 0 and seen[-1] == Grown(model="m")
    with pytest.raises(RecipeError, match="mode"):
        recipe_from_flags(Grown(), {"mode": "c"})  # a bad choice: the recipe's one-line error


def test_a_field_no_flag_can_carry_must_be_declared_yaml_only() -> None:
    from pydantic import BaseModel

    class Part(BaseModel):
        x: int = 0

    class Grown(Recipe):
        parts: list[Part] = []

    with pytest.raises(TypeError, match="YAML_ONLY"):
        recipe_flags(Grown)


def test_flags_over_a_recipe_file(tmp_path: Path) -> None:
    base = full_recipe()
    values = {flag.name: None for flag in recipe_flags()}
    assert recipe_from_flags(base, values, model=base.model) == base  # nothing given: unchanged
    values.update(ratio=0.5, ignore="a,b", recover_steps=7, sequential=False)
    merged = recipe_from_flags(base, values, model="other")
    assert merged.model == "other" and merged.ratio == 0.5 and merged.ignore == ["a", "b"]
    assert merged.recover.steps == 7 and merged.recover.lr == base.recover.lr
    assert merged.sequential is False and merged.overrides == base.overrides


def test_a_bad_choice_is_one_error_line(tmp_path: Path) -> None:
    result = cli("compress", "default", "--allocation", "greedy", "--out", "X", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "allocation" in lines[0]
    assert list(tmp_path.iterdir()) == []
