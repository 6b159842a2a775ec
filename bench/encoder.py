"""Encoder sweep: all-MiniLM-L6-v2 (`minilm`) x method x ratio -> cosine to the dense model's
sentence embeddings, BBC topic probe accuracy, params, bytes, seconds.

Every compressed model goes through save and `rankwise.load` before it is measured, so the
figures are those of the directory a user gets. In one process: the encoder is 22M parameters.

    python bench/encoder.py                                  # whiten, svd x 0.2, 0.4, 0.6
    python bench/encoder.py --methods whiten --ratios 0.4 --out /tmp/encoder.md
    python bench/encoder.py --methods svd --rows svd.json   # parts, then one table:
    python bench/encoder.py --merge whiten.json,svd.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import rankwise
from rankwise.evaluation.encoder import EncoderTexts, encoder_figures, probe_accuracy
from rankwise.model.accounting import count_parameters
from rankwise.model.loading import minilm_dir
from rankwise.storage.saved import directory_bytes
from rankwise.storage.sources import load_model

RESULTS = Path(__file__).parent / "results"


def run_one(method: str, ratio: float, texts: EncoderTexts, dense: object, dense_probe: float):
    loaded = load_model("minilm")
    recipe = rankwise.Recipe(model="minilm", method=method, ratio=ratio)
    start = time.perf_counter()
    result = rankwise.compress(loaded.model, recipe, loaded.tokenizer)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = rankwise.save(result, str(Path(tmp) / "m"), loaded.tokenizer)
        size = directory_bytes(out)
        model = rankwise.load(out)
    figures = encoder_figures(model, loaded.tokenizer, texts, dense, dense_probe)
    return {
        "method": method,
        "ratio": ratio,
        "targeted_ratio": result.targeted_ratio,
        "model_ratio": result.model_ratio,
        "allocation": result.recipe.allocation,
        "params": count_parameters(model),
        "bytes": size,
        "seconds": seconds,
        **figures,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| method | ratio | allocation | targeted removed | model removed | params | bytes "
        "| cosine | probe acc | compress s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['allocation']} | {r['targeted_ratio']:.1%} "
            f"| {r['model_ratio']:.1%} | {r['params']:,} | {r['bytes'] / 1e6:.1f} MB "
            f"| {r['cosine']:.4f} | {r['probe_accuracy']:.4f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="whiten,svd")
    parser.add_argument("--ratios", default="0.2,0.4,0.6")
    parser.add_argument("--out", type=Path, default=RESULTS / "encoder.md")
    parser.add_argument("--rows", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--merge", help="comma-separated --rows files: write the table from them, measure nothing"
    )
    args = parser.parse_args()
    texts = EncoderTexts.bbc()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        dense_info, rows = parts[0]["dense"], [r for p in parts for r in p["rows"]]
    else:
        dense = load_model("minilm")
        dense_info = {
            "probe": probe_accuracy(dense.model, dense.tokenizer, texts),
            "params": count_parameters(dense.model),
            "bytes": directory_bytes(minilm_dir()),
        }
        rows = []
        for method in args.methods.split(","):
            for ratio in [float(r) for r in args.ratios.split(",")]:
                rows.append(run_one(method, ratio, texts, dense.model, dense_info["probe"]))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        if args.rows:
            args.rows.write_text(json.dumps({"dense": dense_info, "rows": rows}, indent=2))
    write_table(args, texts, dense_info, rows)


def write_table(args: argparse.Namespace, texts: EncoderTexts, dense: dict, rows: list) -> None:
    methods = ",".join(dict.fromkeys(r["method"] for r in rows))
    ratios = ",".join(str(r) for r in dict.fromkeys(r["ratio"] for r in rows))
    text = "\n\n".join(
        [
            "# Encoder sweep (all-MiniLM-L6-v2, `minilm`)",
            "Calibration: 128 BBC windows of 512 tokens (calibration split). cosine: mean cosine "
            f"similarity to the dense model's embeddings (mean pooled, normalized) of "
            f"{len(texts.sentences)} held-out BBC sentences. probe acc: logistic regression on "
            f"the 5 BBC topics, trained on {len(texts.train)} calibration-split articles, tested "
            f"on the {len(texts.test)} held-out ones (first 128 tokens each). Importance "
            "allocation needs an LM loss: encoders fall back to uniform.",
            f"Dense: {dense['params']:,} params, {dense['bytes'] / 1e6:.1f} MB, probe acc "
            f"{dense['probe']:.4f}, cosine 1.",
            table(rows),
            f"Command: `python bench/encoder.py --methods {methods} --ratios {ratios}`"
            f" (torch {torch.__version__}, {torch.get_num_threads()} threads).",
        ]
    )
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
