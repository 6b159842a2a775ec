"""Semi-NMF features of SmolLM2's MLPs, and what compressed models keep of them.

For each layer: the MLP activations (input of `down_proj`) on held-out BBC windows, factorized
into k features (winner-take-all: a tenth of the neurons each); the relative error against the
rank-k SVD floor; then, for each compressed directory given, its activations at the same layer
on the same tokens read in those features: the median and lowest correlation of a feature's
coefficients across the two models ("kept"), and how far the activations moved. Ends with the
features of one layer as text, and the ones the most compressed model keeps least.

    python bench/features.py /tmp/w20 /tmp/w40 /tmp/w60       # default: layers 3, 10, 15, 22, 27
    python bench/features.py D --layers 15 --features 64 --out /tmp/features.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rankwise.analysis.features import (
    Comparison,
    FeatureOptions,
    activation_module,
    collect_activations,
    compare,
    describe,
    fit_features,
)
from rankwise.analysis.seminmf import svd_relative_error
from rankwise.data import corpora
from rankwise.storage.sources import load_model

RESULTS = Path(__file__).parent / "results"


def layer_row(dense, others, windows, options) -> tuple[dict, object, dict[str, Comparison]]:
    name = activation_module(dense, options)
    acts = collect_activations(dense, name, windows)
    start = time.perf_counter()
    fit = fit_features(acts, options)
    seconds = time.perf_counter() - start
    found = {label: compare(model, name, windows, acts, fit) for label, model in others.items()}
    row = {
        "layer": options.layer,
        "module": name,
        "error": fit.relative_error,
        "svd": svd_relative_error(acts, options.features),
        "iterations": len(fit.errors),
        "seconds": seconds,
    }
    return row, (name, fit), found


def kept_cell(found: Comparison) -> str:
    kept = found.kept.sort().values
    median, lowest = float(kept[len(kept) // 2]), float(kept[0])
    return f"{median:.2f} / {lowest:.2f} / {found.activation_change:.2f}"


def feature_lines(records: list[dict], kept: torch.Tensor | None, label: str) -> list[str]:
    lines = []
    for r in records:
        contexts = " · ".join(c.replace("\n", "\\n").replace("|", "/") for c in r["contexts"][:3])
        promotes = " ".join(repr(t) for t in (r["promotes"] or [])[:5]).replace("|", "/")
        extra = f" | {float(kept[r['feature']]):.2f}" if kept is not None else ""
        lines.append(f"| {r['feature']} | {r['share']:.3f} | {contexts} | {promotes}{extra} |")
    head = "| # | share | top contexts | promotes"
    head += f" | kept in {label} |" if kept is not None else " |"
    return [head, "|" + "---|" * (5 if kept is not None else 4)] + lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("others", nargs="*", help="compressed directories to compare")
    parser.add_argument("--layers", default="3,10,15,22,27")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--show-layer", type=int, default=27)
    parser.add_argument("--out", type=Path, default=RESULTS / "features.md")
    args = parser.parse_args()
    torch.set_num_threads(2)

    loaded = load_model("default")
    dense, tokenizer = loaded.model, loaded.tokenizer
    others = {Path(o).name: load_model(o).model for o in args.others}
    windows = corpora.eval_windows(tokenizer, ("bbc",), 512, args.windows)["bbc"]
    labels = list(others)
    head = "| layer | module | semi-NMF error | SVD floor | iterations | fit s |"
    head += "".join(f" kept in {label}: median / min / act. change |" for label in labels)
    lines = [head, "|" + "---|" * (6 + len(labels))]
    shown = None
    for layer in (int(x) for x in args.layers.split(",")):
        options = FeatureOptions(layer=layer, features=args.features)
        row, (name, fit), found = layer_row(dense, others, windows, options)
        cells = [f"{layer}", name, f"{row['error']:.3f}", f"{row['svd']:.3f}"]
        cells += [str(row["iterations"]), f"{row['seconds']:.1f}"]
        cells += [kept_cell(found[label]) for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        if layer == args.show_layer:
            shown = (name, fit, found, options)

    text = [
        f"# Semi-NMF features of SmolLM2-135M's MLPs ({args.features} features)",
        "",
        f"Command: `python bench/features.py {' '.join(args.others)}` (held-out BBC, "
        f"{args.windows} windows of 512 tokens; "
        "cells: median / lowest correlation of a feature's coefficients, relative change "
        "of the activations).",
        "",
        *lines,
    ]
    if shown is not None:
        name, fit, found, options = shown
        records = describe(dense, tokenizer, windows, name, fit, options)
        last = labels[-1] if labels else None
        kept = found[last].kept if last else None
        text += ["", f"## The features of {name}", "", *feature_lines(records, kept, last or "")]
        if kept is not None:
            order = kept.argsort()[:5].tolist()
            least = [records[i] for i in order]
            text += ["", f"## The five {last} keeps least", ""]
            text += feature_lines(least, kept, last)
    args.out.write_text("\n".join(text) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
