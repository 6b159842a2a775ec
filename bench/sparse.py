"""Low rank plus sparse against pure low rank (whiten) at the same ratio and allocation.

For each ratio and method: `rankwise compress` (its own process), `rankwise eval` (perplexity on
BBC held-out and Wikipedia, params, safetensors bytes), then CPU prefill and decode timing of the
saved model (this script's `time` subcommand, its own process). Every heavy step can run under the
shared lock (`--lock FILE`: `flock FILE timeout 600 ...`), one at a time. Steps whose outputs exist
in `--workdir` are skipped, so an interrupted run resumes.

    python bench/sparse.py --ratios 0.4,0.6 --lock /tmp/rankwise-cpu.lock
    python bench/sparse.py --stats /tmp/stats.safetensors ...  # one-pass statistics, reused
    python bench/sparse.py time DIR [DIR ...]                 # timing only (JSON on stdout)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rankwise.storage.manifest import Manifest

RESULTS = Path(__file__).parent / "results"
METHODS = ("whiten", "sparse")
STREAMS = ("bbc", "wiki")


def locked(command: list[str], lock: str | None) -> list[str]:
    return ["flock", lock, "timeout", "600", *command] if lock else command


def rankwise_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankwise", *args]


def step(command: list[str], done: Path, log: Path) -> None:
    """Run one step unless its output exists; its output goes to `log`."""
    if done.exists():
        return
    with log.open("w") as sink:
        subprocess.run(command, check=True, stdout=sink, stderr=subprocess.STDOUT)


def time_model(path: str, prompt: int = 512, decode: int = 32, repeats: int = 5) -> dict:
    """Median seconds of one prefill of `prompt` tokens, and per decoded token with the cache."""
    import torch

    import rankwise
    from rankwise.storage.sources import load_model

    model = load_model(path).model if not Path(path).is_dir() else rankwise.load(path)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.manual_seed(0))
    prefill, per_token = [], []
    with torch.inference_mode():
        model(ids, use_cache=False)  # warm-up (builds the cached CSR matrices)
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill.append(time.perf_counter() - start)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)  # (1, 1)
            start = time.perf_counter()
            for _ in range(decode):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            per_token.append((time.perf_counter() - start) / decode)
    return {
        "prefill_s": statistics.median(prefill),
        "decode_s": statistics.median(per_token),
        "threads": torch.get_num_threads(),
        "prompt": prompt,
    }


def run_all(args: argparse.Namespace) -> list[dict]:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    suffix = "s" if args.stats else ""
    for ratio in (float(r) for r in args.ratios.split(",")):
        for method in METHODS:
            name = f"{method}{int(round(ratio * 100))}{suffix}"
            out = work / name
            compress = ["compress", "default", "--method", method, "--ratio", str(ratio)]
            compress += ["--stats", args.stats] if args.stats else []
            compress += ["--out", str(out), "--overwrite", "--json", f"{out}.compress.json"]
            step(
                locked(rankwise_cli(*compress), args.lock),
                Path(f"{out}.compress.json"),
                Path(f"{out}.log"),
            )
            evaluate = ["eval", str(out), "--json", f"{out}.eval.json"]
            step(
                locked(rankwise_cli(*evaluate), args.lock),
                Path(f"{out}.eval.json"),
                Path(f"{out}.eval.log"),
            )
            timing = [sys.executable, __file__, "time", str(out), "--json", f"{out}.time.json"]
            step(locked(timing, args.lock), Path(f"{out}.time.json"), Path(f"{out}.time.log"))
            rows.append(collect(out, method, ratio))
    return rows


def collect(out: Path, method: str, ratio: float) -> dict:
    compressed = json.loads(Path(f"{out}.compress.json").read_text())["compressed"]
    evaluated = json.loads(Path(f"{out}.eval.json").read_text())
    timing = json.loads(Path(f"{out}.time.json").read_text())[str(out)]
    layers = Manifest.read(out).layers
    nnz = sum(layer.nnz for layer in layers)
    sparse_layers = sum(1 for layer in layers if layer.nnz)
    return {
        "method": method,
        "ratio": ratio,
        "targeted_ratio": compressed["targeted_ratio"],
        "params": evaluated["params"],
        "bytes": evaluated["bytes"],
        "perplexity": evaluated["perplexity"],
        "seconds": compressed["seconds"],
        "nnz": nnz,
        "sparse_layers": sparse_layers,
        **timing,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| ratio | method | targeted removed | params | safetensors bytes | ppl BBC | ppl wiki "
        "| layers with S | nonzeros | prefill 512 ms | decode ms/token | compress s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        ppl = row["perplexity"]
        lines.append(
            f"| {row['ratio']:g} | {row['method']} | {row['targeted_ratio']:.2%} | "
            f"{row['params']:,} | {row['bytes']:,} | {ppl['bbc']:.2f} | {ppl['wiki']:.2f} | "
            f"{row['sparse_layers']} | {row['nnz']:,} | {row['prefill_s'] * 1e3:.0f} | "
            f"{row['decode_s'] * 1e3:.1f} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "time":
        parser = argparse.ArgumentParser(description="prefill and decode timing")
        parser.add_argument("dirs", nargs="+")
        parser.add_argument("--json")
        args = parser.parse_args(sys.argv[2:])
        figures = {d: time_model(d) for d in args.dirs}
        text = json.dumps(figures, indent=1)
        if args.json:
            Path(args.json).write_text(text)
        print(text)
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", default="0.4,0.6")
    parser.add_argument("--stats", help="one-pass statistics file (default: sequential)")
    parser.add_argument("--lock", help="run each heavy step under flock LOCK timeout 600")
    parser.add_argument("--workdir", default="bench/work/sparse")
    parser.add_argument("--out", default=str(RESULTS / "sparse.md"))
    args = parser.parse_args()
    rows = run_all(args)
    text = (
        "# Low rank plus sparse against pure low rank (SmolLM2-135M)\n\n"
        + table(rows)
        + f"\n\nCommand: `python bench/sparse.py {' '.join(sys.argv[1:])}`\n"
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
