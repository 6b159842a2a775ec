"""The report's pictures: plain data in, a matplotlib Figure out.

Pure functions, no file or model access, no pyplot (its global figure registry would leak state
between calls): each function builds a `Figure` on the Agg canvas and the caller saves it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator, NullFormatter

# `model.layers.12.self_attn.q_proj` -> block `model.layers.12`, kind `self_attn.q_proj`
_BLOCK = re.compile(r"^(?P<block>.*?\.\d+)\.(?P<kind>.+)$")


@dataclass
class QualityPoint:
    """One model on the quality-versus-ratio plot."""

    label: str  # what the point is called (a directory name, "dense")
    group: str  # points of one group are joined by a line (method, allocation, windows)
    ratio: float  # targeted parameters removed (0 for the dense model)
    perplexity: dict[str, float] = field(default_factory=dict)  # stream -> perplexity
    accuracy: dict[str, float] = field(default_factory=dict)  # task -> accuracy (0..1)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _plain_log_labels(ax: object) -> None:
    """Log-scale y ticks as plain numbers (200, not 2x10^2). Within about a decade the log
    locator would leave one or two ticks: evenly spaced round numbers read better there."""
    low, high = ax.get_ylim()
    if high / low < 12:
        ax.yaxis.set_major_locator(MaxNLocator(8, steps=[1, 2, 2.5, 5, 10]))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:  # matplotlib's choice of minor labels (none past a decade or so), as plain numbers
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def _scaled(values: list[float], units: tuple[str, ...]) -> tuple[list[float], str]:
    """Values divided by the power of 1000 that suits the largest, with its unit name."""
    power = 0
    while power + 1 < len(units) and max(values) >= 1000 ** (power + 1):
        power += 1
    return [v / 1000**power for v in values], units[power]


def _split_name(name: str) -> tuple[str, str]:
    match = _BLOCK.match(name)
    return (match["block"], match["kind"]) if match else (name, "")


def _short_kinds(kinds: list[str]) -> list[str]:
    """`self_attn.q_proj` -> `q_proj`, unless two kinds would then read the same."""
    short = [kind.rsplit(".", 1)[-1] for kind in kinds]
    return short if len(set(short)) == len(short) else kinds


def kept_grid(kept: dict[str, float]) -> tuple[list[str], list[str], np.ndarray]:
    """Layer name -> kept fraction, laid out as blocks (rows) x layer kinds (columns)."""
    blocks: list[str] = []
    kinds: list[str] = []
    for name in kept:
        block, kind = _split_name(name)
        blocks += [block] * (block not in blocks)
        kinds += [kind] * (kind not in kinds)
    grid = np.full((len(blocks), len(kinds)), np.nan)  # (blocks, kinds)
    for name, fraction in kept.items():
        block, kind = _split_name(name)
        grid[blocks.index(block), kinds.index(kind)] = fraction
    return blocks, kinds, grid


def rank_kept_figure(runs: dict[str, dict[str, float]]) -> Figure:
    """One heatmap per run: the fraction of each layer's parameters kept (1 = left dense)."""
    layouts = {label: kept_grid(kept) for label, kept in runs.items()}
    rows = max(len(blocks) for blocks, _, _ in layouts.values())
    cols = max(len(kinds) for _, kinds, _ in layouts.values())
    figure = _figure(1.2 + len(runs) * (0.55 * cols + 1.0), max(3.2, 1.6 + 0.27 * rows))
    axes = figure.subplots(1, len(runs), squeeze=False)[0]
    image = None
    for ax, (label, (blocks, kinds, grid)) in zip(axes, layouts.items(), strict=True):
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(kinds)), _short_kinds(kinds), rotation=45, ha="right", fontsize=8)
        ticks = [b.rsplit(".", 1)[-1] if b[-1].isdigit() else b for b in blocks]  # index or name
        ax.set_yticks(range(len(blocks)), ticks, fontsize=7)
        ax.set_xlabel("layer")
        for (row, col), value in np.ndenumerate(grid):
            if not math.isnan(value):
                color = "black" if value > 0.6 else "white"
                ax.text(
                    col,
                    row,
                    f"{100 * value:.0f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color=color,
                )
    common = {b.rsplit(".", 1)[0] for blocks, _, _ in layouts.values() for b in blocks}
    axes[0].set_ylabel(f"block ({common.pop()}.N)" if len(common) == 1 else "block")
    figure.colorbar(image, ax=list(axes), label="kept (fraction)", shrink=0.6 if rows > 8 else 1.0)
    figure.suptitle("Rank kept per layer (% of the dense layer's parameters)", fontsize=11)
    return figure


def spectra_figure(
    spectra: dict[str, dict[str, np.ndarray]], dense: dict[str, np.ndarray]
) -> Figure:
    """Per selected layer: singular values of each run's left @ right, and of the dense weight
    where it was found, on a log scale."""
    layers = list(spectra)
    cols = min(2, len(layers))
    rows = math.ceil(len(layers) / cols)
    figure = _figure(5.2 * cols, 3.4 * rows)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers, strict=False):
        if layer in dense:
            ax.semilogy(dense[layer], color="0.55", lw=2.2, label="dense weight")
        for label, values in spectra[layer].items():
            ax.semilogy(values, lw=1.3, label=f"{label} (left@right, rank {len(values)})")
        _plain_log_labels(ax)
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("index of singular value")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.set_ylabel("singular value")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(layers) :]:
        ax.set_visible(False)
    figure.suptitle("Singular-value spectra of selected layers", fontsize=11)
    return figure


def quality_figure(points: list[QualityPoint], streams: list[str], tasks: list[str]) -> Figure:
    """Perplexity (log scale) per stream and accuracy per task against the targeted ratio: one
    panel each, one line per group, the dense model (ratio 0) as a dashed reference."""
    panels = [("perplexity", s) for s in streams] + [("accuracy", t) for t in tasks]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure = _figure(5.0 * cols, 3.8 * rows)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    groups = list(dict.fromkeys(p.group for p in points if p.ratio > 0))
    colors = {group: f"C{i % 10}" for i, group in enumerate(groups)}
    for ax, (kind, name) in zip(axes, panels, strict=False):
        measured = [p for p in points if name in getattr(p, kind)]
        for group in groups:
            chosen = sorted((p for p in measured if p.group == group), key=lambda p: p.ratio)
            ratios = [100 * p.ratio for p in chosen]
            values = [getattr(p, kind)[name] for p in chosen]
            ax.plot(ratios, values, "o-", color=colors[group], label=group)
            for point, x, y in zip(chosen, ratios, values, strict=True):
                ax.annotate(
                    point.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        for point in (p for p in measured if p.ratio == 0):
            value = getattr(point, kind)[name]
            ax.axhline(value, ls="--", color="0.5", lw=1)
            ax.plot([0], [value], "s", color="0.3")
            ax.annotate(
                f"{point.label} {value:.3g}",
                (0, value),
                xytext=(5, 5),
                fontsize=7,
                textcoords="offset points",
            )
        ax.margins(x=0.1, y=0.12)
        if kind == "perplexity":
            ax.set_yscale("log")
            _plain_log_labels(ax)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("targeted parameters removed (%)")
        ax.set_ylabel("perplexity (log scale)" if kind == "perplexity" else "accuracy")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    title = "Perplexity" if not tasks else "Accuracy" if not streams else "Perplexity and accuracy"
    figure.suptitle(f"{title} against compression ratio", fontsize=11)
    return figure


def size_figure(
    labels: list[str], params: list[int], sizes: list[int], reference: int | None = None
) -> Figure:
    """Parameters and bytes on disk per model, as horizontal bars; with `reference` (the dense
    model's index) each bar also says its share of that one."""
    figure = _figure(10.0, 1.4 + 0.45 * len(labels))
    axes = figure.subplots(1, 2, sharey=True)
    counts, count_unit = _scaled([float(p) for p in params], ("", "thousand", "million", "billion"))
    disk, disk_unit = _scaled([float(b) for b in sizes], ("B", "kB", "MB", "GB"))
    panels = (
        (axes[0], counts, f"parameters ({count_unit})".replace(" ()", "")),
        (axes[1], disk, f"bytes on disk ({disk_unit})"),
    )
    for ax, values, title in panels:
        bars = ax.barh(range(len(labels)), values, color=[f"C{i % 10}" for i in range(len(labels))])
        texts = [f"{v:.1f}" for v in values]
        if reference is not None:
            texts = [
                f"{t} ({v / values[reference]:.0%})" for t, v in zip(texts, values, strict=True)
            ]
        ax.bar_label(bars, texts, padding=3, fontsize=8)
        ax.set_xlabel(title)
        ax.set_xlim(0, max(values) * 1.3)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle("Model size", fontsize=11)
    return figure
