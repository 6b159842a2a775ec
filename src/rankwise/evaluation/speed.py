"""Inference speed of a model against a reference: tokens/s, peak memory, and the physical bound.

The two models are timed in alternating runs (model, reference, model, ...) and each figure is
the median of its runs, so a slow spell of a shared machine lands on both. Beside each ratio
stands the bound the multiply-adds allow: every linear (factorized ones at r*(out+in), dense
ones and the LM head at out*in) plus attention's score and value products, reference over model.
A factorized model cannot beat that bound; how close it gets is what the fast path is worth.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rankwise.core.errors import RankwiseError
from rankwise.model.layers import LowRankLinear
from rankwise.model.modules import is_conv1d


@dataclass(frozen=True)
class Workload:
    """Prefill: one forward over batch x tokens (all logits). Decode: greedy, `tokens` new."""

    name: str
    kind: str  # "prefill" | "decode"
    batch: int
    tokens: int  # prompt length (prefill) or new tokens (decode)
    prompt: int = 0  # prompt length before decoding

    @property
    def counted_tokens(self) -> int:
        """Tokens per run that tokens/s counts: prompt tokens read, or new tokens written."""
        return self.batch * self.tokens


WORKLOADS: tuple[Workload, ...] = (
    Workload("prefill 1x512", "prefill", 1, 512),
    Workload("prefill 8x128", "prefill", 8, 128),
    Workload("decode 1x64", "decode", 1, 64, prompt=32),
    Workload("decode 8x64", "decode", 8, 64, prompt=32),
)


class BenchError(RankwiseError):
    """A model that cannot be benchmarked (not a causal LM)."""


def workload_ids(work: Workload, vocab: int, seed: int = 0) -> torch.Tensor:
    """Fixed random token ids: speed does not depend on the text, only on the shapes."""
    length = work.tokens if work.kind == "prefill" else work.prompt
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (work.batch, length), generator=generator)  # (batch, length)


Runner = Callable[[Workload, torch.Tensor], None]


def make_runner(model: nn.Module, compile_model: bool = False) -> Runner:
    """One prefill forward, or one greedy generation that never stops early.

    With `compile_model`, prefill runs through torch.compile and generate uses a static cache,
    which makes transformers compile the decoding step (on CPU only when asked to).
    """
    forward = torch.compile(model, dynamic=False) if compile_model else model
    extra: dict[str, object] = {}
    if compile_model:
        from transformers import CompileConfig

        config = CompileConfig(mode="default")  # "reduce-overhead" means CUDA graphs
        config._compile_all_devices = True  # transformers' own switch for compiling on CPU
        extra = {"cache_implementation": "static", "compile_config": config}

    def run(work: Workload, ids: torch.Tensor) -> None:
        with torch.inference_mode():
            if work.kind == "prefill":
                forward(input_ids=ids, use_cache=False)
                return
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=work.tokens,
                min_new_tokens=work.tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                **extra,
            )

    return run


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(
    runners: dict[str, Runner], work: Workload, repeats: int, vocab: int
) -> dict[str, list[float]]:
    """Seconds per run for each model, runs interleaved (ABBA) after one warm-up each."""
    ids = workload_ids(work, vocab)
    for run in runners.values():
        run(work, ids)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(repeats):
        for name in round_order(list(runners), round_):
            seconds[name].append(timed(lambda run=runners[name]: run(work, ids)))
    return seconds


def round_order(names: list[str], round_: int) -> list[str]:
    """A B, then B A, ...: whatever a run leaves behind (allocator state, caches, a neighbour's
    burst) falls on each model as often as on the other. A fixed order measured two copies of the
    same dense model 0.70x and 1.20x apart on this machine."""
    return names if round_ % 2 == 0 else names[::-1]


def linear_macs(model: nn.Module) -> tuple[int, int]:
    """(multiply-adds per token of every linear but the output head, of the output head).

    A factorized layer counts min(r*(out+in), out*in): the merge policy may run it dense.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = 0
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            full = module.out_features * module.in_features
            body += min(module.rank * (module.out_features + module.in_features), full)
        elif isinstance(module, nn.Linear) and module is not head:
            body += module.out_features * module.in_features
        elif is_conv1d(module):
            body += module.weight.numel()
    head_macs = head.weight.numel() if isinstance(head, nn.Linear) else 0
    return body, head_macs


def attention_macs_per_context(config: object) -> int:
    """Score plus value multiply-adds per (query, key) pair, summed over layers and heads."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0)
    heads = getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0)
    hidden = getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
    return 2 * layers * heads * head_dim


def workload_macs(model: nn.Module, work: Workload) -> int:
    """Multiply-adds of one run: linears per token, the head where logits are made, attention."""
    body, head = linear_macs(model)
    attention = attention_macs_per_context(model.config)
    if work.kind == "prefill":
        n = work.tokens
        pairs = n * (n + 1) // 2  # causal: query i sees i+1 keys
        return work.batch * (n * (body + head) + attention * pairs)
    p, n = work.prompt, work.tokens
    rows = p + n - 1  # the prompt once, then every new token but the last goes back in
    pairs = p * (p + 1) // 2 + sum(p + i + 1 for i in range(n - 1))
    return work.batch * (rows * body + n * head + attention * pairs)


@dataclass
class Row:
    """One workload: tokens/s of model and reference, their ratio, and the multiply-add bound."""

    workload: str
    model_tps: float
    reference_tps: float
    ratio: float
    bound: float
    model_seconds: list[float] = field(default_factory=list)
    reference_seconds: list[float] = field(default_factory=list)


def vocab_size(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def bounds(
    model: nn.Module, reference: nn.Module, workloads: tuple[Workload, ...] = WORKLOADS
) -> dict[str, float]:
    """Reference over model multiply-adds per workload (count before any merging)."""
    return {w.name: workload_macs(reference, w) / workload_macs(model, w) for w in workloads}


def compare(
    model: nn.Module,
    reference: nn.Module,
    bound: dict[str, float],
    workloads: tuple[Workload, ...] = WORKLOADS,
    repeats: int = 5,
    compile_model: bool = False,
) -> list[Row]:
    """Time `model` against `reference` on each workload (alternating runs, medians)."""
    vocab = min(vocab_size(model), vocab_size(reference))
    runners = {
        "model": make_runner(model, compile_model),
        "reference": make_runner(reference, compile_model),
    }
    rows = []
    for work in workloads:
        runs = alternate(runners, work, repeats, vocab)
        m_tps = work.counted_tokens / statistics.median(runs["model"])
        r_tps = work.counted_tokens / statistics.median(runs["reference"])
        rows.append(Row(work.name, m_tps, r_tps, m_tps / r_tps, bound[work.name], *runs.values()))
    return rows


_PEAK_SCRIPT = """
import json, os, sys, threading, torch
torch.set_num_threads({threads})
from rankwise.storage.sources import load_model
from rankwise.storage.saved import is_compressed_dir, load_compressed
from rankwise.evaluation.speed import make_runner, select_workloads, vocab_size, workload_ids
def resident_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
spec, policy, names = {spec!r}, {policy!r}, {names!r}
before = resident_kib()
if policy and is_compressed_dir(spec):
    model = load_compressed(spec, merge_policy=policy).model
else:
    model = load_model(spec).model
loaded = resident_kib()
peak, stop = [loaded], threading.Event()
def sample():  # the peak while running, not the transient of building the model
    while not stop.is_set():
        peak[0] = max(peak[0], resident_kib())
        stop.wait(0.002)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
run = make_runner(model)
for work in select_workloads(names):
    run(work, workload_ids(work, vocab_size(model)))
stop.set()
sampler.join()
print(json.dumps({{"loaded_mb": (loaded - before) / 1024, "peak_mb": (peak[0] - before) / 1024}}))
"""


def peak_memory(
    spec: str, policy: str | None, threads: int, workloads: tuple[Workload, ...] = WORKLOADS
) -> dict[str, float]:
    """Resident MiB a fresh process adds (above its imports): after loading `spec`, and at the
    peak while running every workload once (sampled every 2 ms from /proc/self/statm, Linux).

    Each model gets its own process, so neither sees the other's memory; the transient of
    building the architecture before the factors are installed is not counted as the peak.
    """
    names = [w.name for w in workloads]
    script = _PEAK_SCRIPT.format(spec=spec, policy=policy, threads=threads, names=names)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise BenchError(f"peak memory run failed for {spec}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parameter_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def rows_as_dicts(rows: list[Row]) -> list[dict[str, object]]:
    return [asdict(row) for row in rows]


def load_for_bench(spec: str) -> nn.Module:
    """A model with every factor kept (the policy is applied after counting multiply-adds)."""
    from rankwise.storage.saved import is_compressed_dir, load_compressed
    from rankwise.storage.sources import load_model

    model = (
        load_compressed(spec, merge_policy="never").model
        if is_compressed_dir(spec)
        else load_model(spec).model
    )
    if not (hasattr(model, "generate") and hasattr(model, "get_output_embeddings")):
        raise BenchError(f"{spec} is not a causal language model: nothing to decode")
    return model


@dataclass(frozen=True)
class BenchOptions:
    """How `rankwise bench` measures (every CLI flag but the two models)."""

    merge_policy: str = "auto"
    repeats: int = 5
    threads: int = 2
    memory: bool = True
    compile_model: bool = False
    workloads: tuple[Workload, ...] = WORKLOADS


def select_workloads(names: list[str] | None) -> tuple[Workload, ...]:
    """The workloads named (all when None), refusing unknown names."""
    if not names:
        return WORKLOADS
    known = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown workload {unknown[0]!r}: choose from {', '.join(known)}")
    return tuple(known[n] for n in names)


def bench(spec: str, vs: str = "default", options: BenchOptions | None = None) -> dict[str, object]:
    """Everything `rankwise bench` reports, as plain data (JSON-ready)."""
    from rankwise.storage.merge import check_policy

    opts = options or BenchOptions()
    check_policy(opts.merge_policy)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        return _bench(spec, vs, opts)
    finally:
        torch.set_num_threads(threads_before)  # the caller's process is left as it was


def _bench(spec: str, vs: str, opts: BenchOptions) -> dict[str, object]:
    from rankwise.storage.merge import apply_merge_policy

    memory_mb = (
        {
            "model": peak_memory(spec, opts.merge_policy, opts.threads, opts.workloads),
            "reference": peak_memory(vs, opts.merge_policy, opts.threads, opts.workloads),
        }
        if opts.memory
        else None
    )  # first: each in its own process, before this one holds both models
    model, reference = load_for_bench(spec), load_for_bench(vs)
    bound = bounds(model, reference, opts.workloads)
    start = time.perf_counter()
    merged = apply_merge_policy(model, opts.merge_policy)
    apply_merge_policy(reference, opts.merge_policy)  # a compressed reference: the same policy
    policy_seconds = time.perf_counter() - start
    rows = compare(model, reference, bound, opts.workloads, opts.repeats, opts.compile_model)
    figures: dict[str, object] = {
        "model": spec,
        "reference": vs,
        "threads": opts.threads,
        "repeats": opts.repeats,
        "merge_policy": opts.merge_policy,
        "merged_layers": merged,
        "factorized_layers": sum(isinstance(m, LowRankLinear) for m in model.modules()),
        "policy_seconds": policy_seconds,
        "compile": opts.compile_model,
        "rows": rows_as_dicts(rows),
        "parameter_mb": {
            "model": parameter_bytes(model) / 2**20,
            "reference": parameter_bytes(reference) / 2**20,
        },
    }
    if memory_mb:
        figures["memory_mb"] = memory_mb
    return figures


def speed_table(figures: dict[str, object]) -> list[list[str]]:
    """Header and rows: workload, tokens/s of both, ratio, multiply-add bound."""
    table = [["workload", "model tok/s", "reference tok/s", "ratio", "bound"]]
    for row in figures["rows"]:
        table.append(
            [
                row["workload"],
                f"{row['model_tps']:.1f}",
                f"{row['reference_tps']:.1f}",
                f"{row['ratio']:.2f}x",
                f"{row['bound']:.2f}x",
            ]
        )
    memory = figures.get("memory_mb")
    for key, label in (("loaded_mb", "loaded MiB"), ("peak_mb", "peak MiB")):
        if memory:
            model_mb, ref_mb = memory["model"][key], memory["reference"][key]
            ratio = f"{model_mb / ref_mb:.2f}x" if ref_mb > 0 else ""
            table.append([label, f"{model_mb:.0f}", f"{ref_mb:.0f}", ratio, ""])
    params = figures["parameter_mb"]
    table.append(
        [
            "weights MiB",
            f"{params['model']:.0f}",
            f"{params['reference']:.0f}",
            f"{params['model'] / params['reference']:.2f}x",
            "",
        ]
    )
    return table
