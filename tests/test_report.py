"""`rankwise report`: the HTML page, the images it references, and the figures it finds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, make_windows
from test_cli import cli, error_lines

import rankwise
from rankwise.cli.report import run_report
from rankwise.core.errors import ModelNotFoundError, OutputExistsError, RankwiseError
from rankwise.core.recipe import LayerOverride, Recipe
from rankwise.report.html import read_runs
from rankwise.report.plots import kept_grid
from rankwise.report.spectra import factor_spectrum


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.remote: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.sources.append(values["src"] or "")
        for key in ("src", "href"):
            if (values.get(key) or "").startswith(("http:", "https:", "//")):
                self.remote.append(values[key] or "")


def images(index: Path) -> list[str]:
    parser = _Images()
    parser.feed(index.read_text())
    assert parser.remote == []  # readable offline: nothing fetched from the net
    return parser.sources


def assert_complete(report: Path) -> list[str]:
    """index.html exists and every image it references is a PNG inside the report folder."""
    sources = images(report / "index.html")
    assert sources
    for source in sources:
        assert not source.startswith("/") and ".." not in source
        assert (report / source).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return sources


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two compressed tiny llamas (svd 0.3 with a dense layer, svd 0.5)."""
    root = tmp_path_factory.mktemp("report")
    dense = Recipe(
        method="svd",
        ratio=0.3,
        allocation="uniform",
        overrides=[LayerOverride(pattern=r"0\.self_attn\.k_proj", dense=True)],
    )
    out = []
    for name, recipe in (
        ("a", dense),
        ("b", Recipe(method="svd", ratio=0.5, allocation="uniform")),
    ):
        result = rankwise.compress(make_model("llama"), recipe)
        out.append(Path(rankwise.save(result, str(root / name))))
    return out


def test_one_directory(tiny_dirs: list[Path], tmp_path: Path) -> None:
    index = run_report(tiny_dirs[:1], tmp_path / "r")
    assert index == tmp_path / "r" / "index.html"
    sources = assert_complete(tmp_path / "r")
    assert {"rank_kept.png", "spectra.png", "size.png"} <= set(sources)
    page = index.read_text()
    assert "Nothing measured for a" in page and "svd" in page and "30.0%" in page  # requested


def test_several_directories_with_stored_figures(tiny_dirs: list[Path], tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for source, copy in zip(tiny_dirs, dirs, strict=True):
        shutil.copytree(source, copy)
    for directory, ppl in zip(dirs, (120.0, 150.0), strict=True):
        figures = {"perplexity": {"bbc": ppl}, "accuracy": {"rt_sentiment": ppl / 200}}
        (directory / "eval.json").write_text(json.dumps({**figures, "windows": 2}))
    figures = tmp_path / "dense.json"
    figures.write_text(json.dumps({"name": "default", "perplexity": {"bbc": 100.0}}))
    index = run_report(dirs, tmp_path / "r", figure_files=[figures])
    sources = assert_complete(tmp_path / "r")
    assert "quality.png" in sources and len(sources) == 4
    page = index.read_text()
    assert "120.00" in page and "150.00" in page and "100.00" in page  # dense reference row
    assert page.count("not measured") == 1  # the dense row's accuracy
    assert "acc rt_sentiment" in page and "75.0%" in page
    # the overwrite flag replaces the report; without it nothing changes
    with pytest.raises(OutputExistsError):
        run_report(dirs, tmp_path / "r")
    run_report(dirs[:1], tmp_path / "r", overwrite=True)
    assert "150.00" not in index.read_text()


def test_compress_json_figures(tiny_dirs: list[Path], tmp_path: Path) -> None:
    """`compress --json` output: the compressed row lands on its directory, the dense one is the
    reference line; a list of such files (a bench script's rows) reads the same."""
    compress_json = {
        "recipe": {"method": "svd", "allocation": "uniform"},
        "out": str(tiny_dirs[1]),
        "dense": {"name": "dense", "params": 1, "perplexity": {"wiki": 50.0}},
        "compressed": {"name": "svd 0.5", "targeted_ratio": 0.5, "perplexity": {"wiki": 80.0}},
    }
    figures = tmp_path / "f.json"
    figures.write_text(json.dumps([compress_json, compress_json]))
    index = run_report(tiny_dirs, tmp_path / "r", figure_files=[figures])
    assert "quality.png" in assert_complete(tmp_path / "r")
    page = index.read_text()
    assert "80.00" in page and "Nothing measured for a:" in page  # only the first


def test_missing_directory_writes_nothing(tiny_dirs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope"):
        run_report([tiny_dirs[0], tmp_path / "nope"], tmp_path / "r")
    assert list(tmp_path.iterdir()) == []
    result = cli("report", str(tiny_dirs[0]), "missing", "--out", "r", cwd=tmp_path)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "missing" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ModelNotFoundError, match="not a rankwise model directory"):
        run_report([plain], tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_cli_report(tiny_dirs: list[Path], tmp_path: Path) -> None:
    result = cli(
        "report",
        *map(str, tiny_dirs),
        "--out",
        "r",
        "--layers",
        "model.layers.1.mlp.down_proj",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert_complete(tmp_path / "r")
    assert "model.layers.1.mlp.down_proj" in (tmp_path / "r" / "index.html").read_text()


def test_factor_spectrum_is_the_product_spectrum() -> None:
    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(40, 6, generator=gen), torch.randn(6, 30, generator=gen)
    expected = torch.linalg.svdvals(left.double() @ right.double())[:6].numpy()
    assert np.allclose(factor_spectrum(left, right), expected, rtol=1e-9)


def test_kept_fraction_of_each_layer(tiny_dirs: list[Path]) -> None:
    (run,) = read_runs(tiny_dirs[:1])
    kept = run.kept()
    assert kept["model.layers.0.self_attn.k_proj"] == 1.0  # left dense
    blocks, kinds, grid = kept_grid(kept)
    assert blocks == ["model.layers.0", "model.layers.1"] and len(kinds) == 7
    assert np.all((grid > 0) & (grid <= 1))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless chromium not installed")
def test_renders_in_headless_chromium(tiny_dirs: list[Path], tmp_path: Path) -> None:
    """The page renders in a real browser with every image loaded (non-blank screenshot)."""
    run_report(tiny_dirs, tmp_path / "r")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            (tmp_path / "r" / "index.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from matplotlib.image import imread

    pixels = imread(shot)  # (height, width, channels)
    assert pixels.shape[:2] == (2400, 1200)
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 50
    assert re.search("rankwise report", (tmp_path / "r" / "index.html").read_text())


def test_unknown_layer_is_refused(tiny_dirs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(RankwiseError, match="no layer model.layers.9.mlp.up_proj"):
        run_report(tiny_dirs, tmp_path / "r", layers=["model.layers.9.mlp.up_proj"])
    assert not (tmp_path / "r").exists()


def test_compress_eval_stores_figures_for_the_report(tmp_path: Path) -> None:
    """`compress --eval` keeps its perplexities in DIR/eval.json; the report shows them."""
    from conftest import word_tokenizer

    from rankwise.cli.compress import run_compress

    model = make_model("llama", max_position_embeddings=600)
    model.save_pretrained(tmp_path / "dense")
    word_tokenizer().save_pretrained(tmp_path / "dense")
    recipe = Recipe(model=str(tmp_path / "dense"), method="svd", ratio=0.4, allocation="uniform")
    figures = run_compress(recipe, tmp_path / "small", with_eval=True, eval_windows=1)
    stored = json.loads((tmp_path / "small" / "eval.json").read_text())
    assert stored["perplexity"] == figures["compressed"]["perplexity"]
    assert stored["dense_perplexity"] == figures["dense"]["perplexity"]
    assert stored["windows"] == 1 and set(stored["perplexity"]) == {"bbc", "wiki"}
    index = run_report([tmp_path / "small"], tmp_path / "r")
    assert "quality.png" in assert_complete(tmp_path / "r")
    assert f"{stored['perplexity']['bbc']:.2f}" in index.read_text()


def test_eval_windows_measures_without_writing_into_the_directory(tmp_path: Path) -> None:
    from conftest import word_tokenizer

    model = make_model("llama", max_position_embeddings=600)
    result = rankwise.compress(model, Recipe(method="svd", ratio=0.4, allocation="uniform"))
    small = Path(rankwise.save(result, str(tmp_path / "small"), tokenizer=word_tokenizer()))
    before = sorted(p.name for p in small.iterdir())
    index = run_report([small], tmp_path / "r", eval_windows=1)
    assert sorted(p.name for p in small.iterdir()) == before  # the input is left as it was
    assert "quality.png" in assert_complete(tmp_path / "r")
    assert "ppl bbc" in index.read_text() and "not measured" not in index.read_text()


@pytest.mark.parametrize("method", ["svd", "whiten", "sparse"])
def test_report_and_inspect_agree_on_every_model_kind(method: str, tmp_path: Path) -> None:
    """The report's "rank kept" and inspect's "kept" column come from one accounting, sparse
    residuals (values and indices) included."""
    from rankwise.report.runs import read_run
    from rankwise.report.tables import layer_table
    from rankwise.storage.manifest import Manifest

    recipe = Recipe(method=method, ratio=0.4, allocation="uniform", calib_dtype="float32")
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows())
    out = Path(rankwise.save(result, str(tmp_path / method)))
    report_kept = read_run(out, method).kept()
    table = layer_table(Manifest.read(out).layers)
    inspect_kept = dict(zip(table.columns[0]._cells, table.columns[3]._cells, strict=True))
    assert inspect_kept == {name: f"{kept:.1%}" for name, kept in report_kept.items()}
    by_result = {layer.name: layer.count.kept_fraction for layer in result.layers}
    assert report_kept == pytest.approx(by_result)
