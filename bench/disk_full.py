"""A disk that fills up during save: a real small tmpfs (root mounts it), not a mock.

A tiny Llama (a few MB of weights) is compressed by the `rankwise` command into a tmpfs too small
for its output; the run must end with one `error:` line, exit code 2, and nothing left on the
tmpfs (no half model, no temporary sibling). Writes bench/results/disk_full.md.

    sudo python bench/disk_full.py          # needs root for mount -t tmpfs
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).parent / "results"


def tiny_model_dir(root: Path) -> Path:
    """A small Llama (~8 MB of fp32 weights) with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(500)]
    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")
    config = transformers.LlamaConfig(
        vocab_size=501, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    directory = root / "dense"
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("needs root to mount a tmpfs")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        dense = tiny_model_dir(root)
        mount = root / "small-disk"
        mount.mkdir()
        size_kb = 1024  # the compressed model needs several MB
        options = f"size={size_kb}k"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
        try:
            run = subprocess.run(
                [sys.executable, "-m", "rankwise", "compress", str(dense), "--method", "svd",
                 "--ratio", "0.3", "--allocation", "uniform", "--out", str(mount / "out")],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            left = sorted(p.name for p in mount.iterdir())
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    ok = run.returncode == 2 and len(errors) == 1 and not left and "Traceback" not in run.stderr
    table = "\n".join(
        [
            "# Disk full during save (bench/disk_full.py)",
            "",
            f"A {size_kb} KB tmpfs, a tiny Llama compressed into it by `rankwise compress`.",
            "",
            "| exit code | error line | left on the disk | verdict |",
            "|---|---|---|---|",
            f"| {run.returncode} | {errors[0] if errors else '(none)'} | {left or 'nothing'} | "
            f"{'pass' if ok else 'FAIL'} |",
            "",
        ]
    )
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "disk_full.md").write_text(table)
    if not ok:
        print(run.stderr[-3000:], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
