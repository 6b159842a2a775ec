"""Tables the user reads: the compression summary, the per-layer view, semi-NMF features."""

from __future__ import annotations

from pathlib import PurePath

from rich.markup import escape
from rich.table import Table

from rankwise.model.accounting import targeted_totals
from rankwise.storage.manifest import LayerEntry


def human_bytes(count: float) -> str:
    """Decimal units (1 MB = 10^6 bytes), as the bench tables use."""
    for unit in ("B", "KB", "MB"):
        if abs(count) < 1000:
            return f"{int(count)} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.2f} GB"


def fmt_ppl(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def summary_table(rows: list[dict[str, object]], streams: list[str]) -> Table:
    """One row per model: params, ratios, bytes, perplexity per stream, seconds, peak memory
    (the process's peak resident size while it compressed)."""
    table = Table(title="rankwise")
    for column in ("model", "params", "targeted removed", "model removed", "bytes"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for stream in streams:
        table.add_column(f"ppl {stream}", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("peak memory", justify="right")
    for row in rows:
        ppl = row.get("perplexity", {}) or {}
        table.add_row(
            str(row["name"]),
            f"{row['params']:,}",
            f"{row['targeted_ratio']:.1%}" if row.get("targeted_ratio") is not None else "-",
            f"{row['model_ratio']:.1%}" if row.get("model_ratio") is not None else "-",
            human_bytes(row["bytes"]),
            *[fmt_ppl(ppl.get(s)) for s in streams],
            f"{row['seconds']:.1f}" if row.get("seconds") is not None else "-",
            human_bytes(row["peak_memory_mb"] * 2**20) if row.get("peak_memory_mb") else "-",
        )
    return table


def rank_text(rank: object, nnz: object) -> str:
    """'dense', the rank, or the rank and the sparse residual's nonzeros ('96 +3391 nz')."""
    if rank is None:
        return "dense"
    return f"{rank} +{nnz} nz" if nnz else str(rank)


def layer_table(layers: list[LayerEntry]) -> Table:
    """Per-layer: name, shape, rank, kept %, relative error in the method's metric, and (for
    importance allocation) the estimated loss increase; then the totals. Kept parameters come
    from model/accounting.py, sparse residuals' values and indices included."""
    estimated = any(layer.est_loss is not None for layer in layers)
    table = Table(title="layers", show_footer=True)
    columns = ["layer", "shape", "rank", "kept", "rel. error"] + ["est. loss"] * estimated
    for column in columns:
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in layers:
        error, loss = layer.rel_error, layer.est_loss
        if error is None and layer.truncation_error is not None:
            error = layer.truncation_error
        row = [
            layer.name,
            f"{layer.out_features}x{layer.in_features}",
            rank_text(layer.rank, layer.nnz),
            f"{layer.count.kept_fraction:.1%}",
            "-" if error is None else f"{float(error):.4f}",
        ] + (["-" if loss is None else f"{float(loss):.3g}"] * estimated)
        table.add_row(*row)
    dense_total, kept_total = targeted_totals(layer.count for layer in layers)
    loss_total = sum(float(layer.est_loss or 0.0) for layer in layers)
    footer = [
        f"total ({len(layers)} layers)",
        f"{dense_total:,} params",
        f"{kept_total:,} kept",
        f"{kept_total / max(dense_total, 1):.1%}",
        "",
    ] + [f"{loss_total:.3g}"] * estimated
    for column, text in zip(table.columns, footer, strict=True):
        column.footer = text
    return table


def feature_table(figures: dict[str, object]) -> Table:
    """Semi-NMF features: share, how many tokens use each, top contexts, promoted tokens, and
    (against a second model) the correlation it keeps."""
    records = list(figures["records"])  # type: ignore[call-overload]
    kept = any("kept" in r for r in records)
    promotes = any(r.get("promotes") for r in records)
    title = (
        f"{figures['features']} features of {figures['module']} on {figures['tokens']} tokens: "
        f"relative error {float(figures['relative_error']):.3f} "
        f"(rank-{figures['features']} SVD: {float(figures['svd_relative_error']):.3f})"
    )
    table = Table(title=title, show_lines=True)
    for column in ["#", "share", "tokens", "top contexts"] + ["promotes"] * promotes:
        table.add_column(column, justify="left" if column[0] in "tp" else "right")
    if kept:
        table.add_column(f"kept in {PurePath(str(figures.get('vs'))).name}", justify="right")
    for r in records:
        row = [
            str(r["feature"]),
            f"{float(r['share']):.3f}",
            f"{float(r['active_tokens']):.1%}",
            escape("\n".join(c.replace("\n", "\\n") for c in r["contexts"][:3])),
        ]
        if promotes:
            row.append(escape(" ".join(repr(t) for t in (r.get("promotes") or [])[:5])))
        if kept:
            row.append(f"{float(r['kept']):.2f}")
        table.add_row(*row)
    return table
