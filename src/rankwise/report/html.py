"""`rankwise report`: one self-contained HTML page comparing compressed model directories.

Everything it shows is read from the directories (config.json's rankwise block, the stored
factors, `eval.json` written by `rankwise eval` / `compress --eval`) or from figure files the user
names; this module runs no model (`--eval-windows` measures in `commands.run_report`). The page
uses inline CSS and relative PNGs next to it, so the folder can be copied and read offline.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rankwise.core.atomic import atomic_directory
from rankwise.core.errors import RankwiseError
from rankwise.report import plots
from rankwise.report.runs import Run, read_run
from rankwise.report.spectra import dense_spectra, run_spectra, select_layers
from rankwise.report.tables import fmt_ppl, human_bytes, rank_text


def read_runs(directories: list[Path]) -> list[Run]:
    """Check every directory before anything is written; labels are the names, made unique."""
    runs: list[Run] = []
    for directory in directories:
        label = directory.name or str(directory)
        if any(run.label == label for run in runs):
            label = str(directory)
        runs.append(read_run(directory.expanduser().resolve(), label))
    return runs


def figure_rows(content: object) -> list[dict]:
    """Rows from JSON the CLI wrote: `eval --json` (one row), `compress --json` (its dense and
    compressed rows, the latter keyed to its directory by `path`), or a list of either."""
    if isinstance(content, list):
        return [row for item in content for row in figure_rows(item)]
    if not isinstance(content, dict):
        return []
    if "compressed" not in content:
        return [content]
    recipe = content.get("recipe", {})
    group = f"{recipe.get('method')}, {recipe.get('allocation')}" if recipe else None
    compressed = {**content["compressed"], "path": content.get("out", ""), "group": group}
    return [compressed, {**content.get("dense", {}), "name": "dense", "targeted_ratio": 0.0}]


def read_figure_files(paths: list[Path]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        if not path.is_file():
            raise RankwiseError(f"report: figures file not found: {path}")
        try:
            rows += figure_rows(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise RankwiseError(f"report: {path} is not JSON: {err}") from None
    return rows


def attach_figures(runs: list[Run], rows: list[dict]) -> list[dict]:
    """Give each run the figures of the row naming its directory; return the other rows (one
    per dense reference)."""
    others: list[dict] = []
    for row in rows:
        name = str(row.get("path") or row.get("name") or "")
        match = [run for run in runs if name and Path(name).expanduser().resolve() == run.directory]
        for run in match:
            run.figures = {**run.figures, **row}
        reference = not row.get("targeted_ratio")
        seen = any(reference and other.get("name") == row.get("name") for other in others)
        if not match and (row.get("perplexity") or row.get("accuracy")) and not seen:
            others.append(row)
    return others


# --- figures ----------------------------------------------------------------------------------


def quality_points(runs: list[Run], others: list[dict]) -> list[plots.QualityPoint]:
    points = []
    for run in runs:
        if run.measured:
            windows = run.figures.get("windows")
            group = f"{run.manifest.method}, {run.manifest.allocation}"
            group += f", {windows} windows" if windows else ""
            ratio = run.manifest.targeted_ratio
            points.append(point(run.label, group, ratio, run.figures))
    for row in with_dense(runs, others):
        ratio = float(row.get("targeted_ratio") or 0.0)
        label = Path(str(row.get("name", "?"))).name or str(row.get("name"))
        group = "reference" if ratio == 0 else row.get("group") or "figures files"
        points.append(point(label, group, ratio, row))
    return points


def with_dense(runs: list[Run], others: list[dict]) -> list[dict]:
    """The other rows, plus the dense perplexity `compress --eval` stored when none is given."""
    dense = next(
        (r.figures["dense_perplexity"] for r in runs if r.figures.get("dense_perplexity")), None
    )
    if dense and not any(float(row.get("targeted_ratio") or 0) == 0 for row in others):
        return [{"name": "dense", "perplexity": dense}] + others
    return others


def point(label: str, group: str, ratio: float, figures: dict) -> plots.QualityPoint:
    perplexity, accuracy = figures.get("perplexity") or {}, figures.get("accuracy") or {}
    return plots.QualityPoint(label, group, ratio, dict(perplexity), dict(accuracy))


def metrics_of(points: list[plots.QualityPoint]) -> tuple[list[str], list[str]]:
    """The perplexity streams and accuracy tasks with a finite value somewhere, in order seen."""
    streams = [s for p in points for s, v in p.perplexity.items() if math.isfinite(v)]
    tasks = [t for p in points for t, v in p.accuracy.items() if math.isfinite(v)]
    return list(dict.fromkeys(streams)), list(dict.fromkeys(tasks))


@dataclass
class Picture:
    file: str
    title: str
    caption: str
    figure: object  # matplotlib Figure


def pictures(runs: list[Run], others: list[dict], layers: list[str] | None) -> list[Picture]:
    """Every picture the data allows: rank kept and size always, spectra where factors are
    stored, quality where something was measured."""
    kept = Picture(
        "rank_kept.png",
        "Rank kept per layer",
        "Share of each targeted layer's parameters kept, rank x (out + in) / (out x in), "
        "from config.json's rankwise block; 100 = left dense.",
        plots.rank_kept_figure({run.label: run.kept() for run in runs}),
    )
    chosen = [spectra_picture(runs, layers), quality_picture(runs, others)]
    return [kept] + [pic for pic in chosen if pic is not None] + [size_picture(runs)]


def spectra_layers(runs: list[Run], layers: list[str] | None) -> list[str]:
    known = {name for run in runs for name in run.targets}
    unknown = [layer for layer in layers or [] if layer not in known]
    if unknown:
        raise RankwiseError(
            f"report: no layer {unknown[0]} in the directories (see rankwise inspect)"
        )
    if layers:
        return layers
    chosen = select_layers(runs[0])  # and a few of any run that has none of the first's
    for run in runs[1:]:
        chosen += [] if set(chosen) & set(run.targets) else select_layers(run, 2)
    return chosen


def spectra_picture(runs: list[Run], layers: list[str] | None) -> Picture | None:
    layers = spectra_layers(runs, layers)
    spectra = {run.label: run_spectra(run, layers) for run in runs}
    by_layer = {
        layer: {label: s[layer] for label, s in spectra.items() if layer in s} for layer in layers
    }
    by_layer = {layer: values for layer, values in by_layer.items() if values}
    if not by_layer:
        return None
    dense = dense_spectra(runs, list(by_layer))
    source = "and of the dense source model's weight" if dense else "(dense weights not found)"
    return Picture(
        "spectra.png",
        "Singular-value spectra",
        f"Singular values of the stored factors' product left @ right {source}. "
        "Layers (unless --layers chose them): up to four of the first, the most compressed, the "
        f"median, the least compressed and the last layer of {runs[0].label}.",
        plots.spectra_figure(by_layer, dense),
    )


def quality_picture(runs: list[Run], others: list[dict]) -> Picture | None:
    points = quality_points(runs, others)
    streams, tasks = metrics_of(points)
    if not streams and not tasks:
        return None
    return Picture(
        "quality.png",
        "Quality against ratio",
        "Perplexity per evaluation stream and accuracy per task (stored by rankwise eval "
        "/ compress --eval, or from --figures files) against the targeted parameters "
        "removed. Points with different window counts are in different groups: compare "
        "within one.",
        plots.quality_figure(points, streams, tasks),
    )


def size_picture(runs: list[Run]) -> Picture:
    labels = [run.label for run in runs]
    params = [run.manifest.model_params_after for run in runs]
    sizes = [run.bytes for run in runs]
    dense = runs[0].manifest.model_params_before
    if dense:
        labels, params, sizes = ["dense (fp32)"] + labels, [dense] + params, [4 * dense] + sizes
    return Picture(
        "size.png",
        "Parameters and bytes",
        "Whole-model parameters (embeddings and head included, tied weights once) and bytes of "
        "the safetensors files; the dense bytes are its fp32 size, 4 bytes per parameter.",
        plots.size_figure(labels, params, sizes, reference=0 if dense else None),
    )


# --- HTML -------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222;
       padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f1f3f5; } td.name, th.name { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
.muted { color: #888; } details { margin: 0.5em 0; } summary { cursor: pointer; }
"""


def _pct(value: object) -> str:
    return "-" if value is None else f"{float(value):.1%}"


def _row(label: str, title: str, cells: list[object]) -> str:
    name = f'<td class="name" title="{html.escape(title)}">{html.escape(label)}</td>'
    return f"<tr>{name}" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def _measured(figures: dict, streams: list[str], tasks: list[str]) -> list[str]:
    ppl, acc = figures.get("perplexity") or {}, figures.get("accuracy") or {}
    cells = [fmt_ppl(ppl[s]) if s in ppl else "not measured" for s in streams]
    cells += [_pct(acc[t]) if t in acc else "not measured" for t in tasks]
    cells += ["not measured"] if not streams and not tasks else []
    return cells + [str(figures.get("windows", "-"))]


def summary_html(
    runs: list[Run], references: list[dict], streams: list[str], tasks: list[str]
) -> str:
    """One row per directory, then the reference (dense) figures the user gave."""
    head = ["directory", "method", "allocation", "requested", "targeted removed"]
    head += ["model removed", "params", "bytes"] + [f"ppl {s}" for s in streams]
    head += [f"acc {t}" for t in tasks] + ["perplexity"] * (not streams and not tasks)
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head + ["windows"])]
    for run in runs:
        cells = [
            run.manifest.method,
            run.manifest.allocation,
            _pct(run.manifest.ratio),
            _pct(run.manifest.targeted_ratio),
            _pct(run.manifest.model_ratio),
            f"{run.manifest.model_params_after:,}",
            human_bytes(run.bytes),
        ]
        lines.append(
            _row(run.label, str(run.directory), cells + _measured(run.figures, streams, tasks))
        )
    for row in references:
        params, size = row.get("params"), row.get("bytes")
        cells = ["dense", "-", "-", "-", "-", f"{params:,}" if params else "-"]
        cells += [human_bytes(size) if size else "-"]
        label = str(row.get("name", "reference"))
        lines.append(_row(label, label, cells + _measured(row, streams, tasks)))
    return "\n".join(lines) + "</table>"


def layers_html(run: Run) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("shape", "rank", "kept", "rel. error"))
    rows = []
    for name, layer in run.targets.items():
        error = layer.rel_error
        cells = [
            f"{layer.out_features}x{layer.in_features}",
            rank_text(layer.rank, layer.nnz),
            f"{layer.count.kept_fraction:.1%}",
            "-" if error is None else f"{float(error):.4f}",
        ]
        rows.append(
            f'<tr><td class="name">{html.escape(name)}</td>'
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    return (
        f"<details><summary>{html.escape(run.label)}: {len(rows)} layers</summary>"
        f'<table><tr><th class="name">layer</th>{head}</tr>{"".join(rows)}</table>'
        "</details>"
    )


def page_html(
    runs: list[Run], references: list[dict], pics: list[Picture], metrics: tuple[list, list]
) -> str:
    unmeasured = [run.label for run in runs if not run.measured]
    note = (
        f'<p class="muted">Nothing measured for {html.escape(", ".join(unmeasured))}: '
        "run <code>rankwise eval DIR</code> (it stores DIR/eval.json), or pass "
        "<code>--eval-windows N</code> or <code>--figures F.json</code> to the report.</p>"
        if unmeasured
        else ""
    )
    figures = "\n".join(
        f'<h2>{html.escape(p.title)}</h2><figure><img src="{p.file}" alt="{html.escape(p.title)}">'
        f"<figcaption>{html.escape(p.caption)}</figcaption></figure>"
        for p in pics
    )
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rankwise report</title>
<style>{CSS}</style></head><body>
<h1>rankwise report</h1>
<p class="muted">{len(runs)} model director{"y" if len(runs) == 1 else "ies"}, {stamp}.
Ratios: <b>requested</b> and <b>targeted removed</b> count the targeted layers' weights,
<b>model removed</b> the whole model's parameters.</p>
<h2>Summary</h2>
{summary_html(runs, references, *metrics)}
{note}
{figures}
<h2>Layers</h2>
{"".join(layers_html(run) for run in runs)}
</body></html>
"""


def write_report(
    runs: list[Run], out: Path, others: list[dict], layers: list[str] | None = None
) -> Path:
    """Draw the pictures and write out/index.html with them, atomically (all or nothing)."""
    pics = pictures(runs, others, layers)
    metrics = metrics_of(quality_points(runs, []))
    with atomic_directory(out) as tmp:
        for pic in pics:
            pic.figure.savefig(tmp / pic.file)
        references = [row for row in with_dense(runs, others) if not row.get("targeted_ratio")]
        (tmp / "index.html").write_text(page_html(runs, references, pics, metrics))
    return out / "index.html"
