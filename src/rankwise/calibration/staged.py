"""Sequential calibration inside each block, with the block run forward about once.

Sequential calibration gathers block k's grams with blocks 0..k-1 compressed. Done plainly, every
block runs twice over the calibration windows: dense with hooks (the grams), then compressed (the
next block's inputs). Here each block's targets are factorized group by group instead (a group:
the targets that read one tensor: q/k/v, then o, then gate/up with down), each from the gram of
its input with the groups before it already compressed, and what ran before a group's gram is not
run again where it is expensive.

How a block is staged. A probe runs the first batch through a copy of the block and records the
order in which targets are called, which of them read the same tensor (the groups), and which
module returns a target's output as its own (o_proj's is the attention's, by tensor identity).
The last group joins the one before it (`join_last`): the MLP's down projection takes its gram
from the dense gate/up, in their stage. Stage g runs every batch through the copy until group g's
grams are complete, then stops (StopForward); the group is factorized in the model and its
layers swapped into the copy. Work before a stop is done again by later stages, so the attention
must not be: the stage of a group that is one target t returning its parent P's output runs P to
its end and keeps t's input; once t is factorized, P is replaced in the copy by a replay of its
outputs, with t's new layer applied to the kept input. Attention then runs once per block, in the
stage of o_proj, and the MLP twice: for its grams, and in the last pass through the copy, which
gives the block's outputs.

A block the probe cannot stage (a target called twice, or never), and every block with
`staged=False`, is gathered dense and then run through its compressed self
(`_dense_then_compressed`). The two are measured against each other in
bench/results/sequential.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.calibration.blocks import (
    BlockInputs,
    StopForward,
    block_output,
    capture_inputs,
    find_blocks,
    forward_all,
    used_blocks,
)
from rankwise.calibration.grams import GramCollector, narrow_targets
from rankwise.methods import LayerStats
from rankwise.model.memory import release_freed_memory
from rankwise.model.modules import cast_copy, set_module

# called with a group's full target names and statistics; factorizes them in the model
GroupCallback = Callable[[list[str], dict[str, LayerStats]], None]


@dataclass
class Group:
    """Targets (names local to the block, in call order) that read one input tensor."""

    names: list[str]
    parent: str | None = None  # a module returning the group's one target's output as its own


@dataclass
class _Cursor:
    """Which batch the block copy is running, for the replays."""

    batch: int = 0


class _Replay(nn.Module):
    """Stands in the block copy for a module whose work is done: returns, for the batch at
    hand, the output it gave with its target's factors applied."""

    def __init__(self, outputs: list[object], cursor: _Cursor) -> None:
        super().__init__()
        self.outputs, self.cursor = outputs, cursor

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.outputs[self.cursor.batch]


def _ancestors(name: str) -> list[str]:
    """Enclosing modules of a dotted name inside the block, outermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _returns(output: object, tensor: object) -> bool:
    """Is `tensor` the output, or the first element of a tuple output?"""
    if output is tensor:
        return True
    return isinstance(output, tuple) and len(output) > 0 and output[0] is tensor


def probe_groups(block: nn.Module, names: list[str], batch: tuple) -> list[Group] | None:
    """The block's groups from one batch (hidden, args, kwargs); None if it cannot be staged."""
    calls: list[tuple[str, torch.Tensor]] = []
    outputs: dict[str, object] = {}
    watched = set(names) | {a for n in names for a in _ancestors(n)}
    handles = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: calls.append((n, args[0]))
        )
        for n in names
    ] + [
        block.get_submodule(n).register_forward_hook(
            lambda m, args, out, n=n: outputs.__setitem__(n, out)
        )
        for n in watched
    ]
    hidden, args, kwargs = batch
    try:
        block(hidden, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if sorted(n for n, _ in calls) != sorted(names):
        return None
    groups: list[Group] = []
    read: list[torch.Tensor] = []
    for name, tensor in calls:
        if read and tensor is read[-1]:
            groups[-1].names.append(name)
        else:
            groups.append(Group([name]))
            read.append(tensor)
    done: set[str] = set()
    for group in groups:
        if len(group.names) == 1:
            group.parent = _parent(group.names[0], names, outputs, done)
        done.update(group.names)
    return groups


def join_last(groups: list[Group]) -> list[Group]:
    """The block's last group (the MLP's down projection) takes its gram in the stage of the
    group before it, from that group's dense outputs. A stage of its own saves no work (only the
    outputs' pass comes after it) and costs a pass through the group before; and its gram from
    the compressed gate/up gave a worse model on Gemma 3 270M (bench/results/sequential.md)."""
    if len(groups) < 2:
        return groups
    *first, before, last = groups
    return [*first, Group(before.names + last.names)]


def _parent(name: str, names: list[str], outputs: dict[str, object], done: set[str]) -> str | None:
    """The outermost module returning `name`'s output whose other targets are all done."""
    for ancestor in _ancestors(name):
        inside = [n for n in names if n.startswith(ancestor + ".") and n != name]
        if _returns(outputs.get(ancestor), outputs[name]) and all(n in done for n in inside):
            return ancestor
    return None


@dataclass
class _Stage:
    """One group's pass over the batches: its gram, and what a replay of its parent needs."""

    copy: nn.Module
    group: Group
    narrow: set[str]
    kept: list[torch.Tensor] = field(default_factory=list)  # the target's input, per batch
    # per batch, what the parent returned besides the target's output (None: that alone)
    rests: list[tuple | None] = field(default_factory=list)
    # the parent returned the target's output on every batch so far (a replay can stand in)
    replayable: bool = field(init=False)

    def __post_init__(self) -> None:
        self.replayable = self.keeps_input

    @property
    def keeps_input(self) -> bool:
        """A replay of the parent needs the target's input kept (o_proj's: 75 MB for SmolLM2 at
        128 windows); only a group with a parent has one."""
        return self.group.parent is not None

    def run(
        self, batches: BlockInputs, hidden: list[torch.Tensor], cursor: _Cursor
    ) -> dict[str, LayerStats]:
        group = self.group
        collector = GramCollector(self.copy, group.names, self.narrow & set(group.names))
        handles = self._stop_hooks()
        try:
            for index, batch in enumerate(hidden):
                cursor.batch = index
                try:
                    self.copy(batch, *batches.args[index], **batches.kwargs[index])
                except StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            collector.remove()
        return collector.stats()

    def _stop_hooks(self) -> list:
        last = self.group.names[-1]
        target = self.copy.get_submodule(last)
        if self.keeps_input:
            produced: dict[str, object] = {}
            parent = self.copy.get_submodule(self.group.parent)
            return [
                target.register_forward_pre_hook(lambda m, args: self.kept.append(args[0])),
                target.register_forward_hook(lambda m, args, out: produced.update(out=out)),
                parent.register_forward_hook(lambda m, args, out: self._end(out, produced["out"])),
            ]
        if last in self.narrow:  # the gram of its outputs: stop once it has run
            return [target.register_forward_hook(_stop)]
        return [target.register_forward_pre_hook(_stop)]  # after the collector's hook

    def _end(self, output: object, produced: object) -> None:
        self.replayable = self.replayable and _returns(output, produced)
        self.rests.append(None if output is produced else tuple(output[1:]))
        raise StopForward

    def replay(self, cursor: _Cursor) -> _Replay | None:
        """The parent's outputs with the target's new layer applied to the kept inputs."""
        if not self.replayable:
            return None
        layer = self.copy.get_submodule(self.group.names[-1])
        outputs: list[object] = []
        for kept, rest in zip(self.kept, self.rests, strict=True):
            value = layer(kept)
            outputs.append(value if rest is None else (value, *rest))
        self.kept.clear()
        return _Replay(outputs, cursor)


def _stop(*_: object) -> None:
    raise StopForward


@dataclass
class BlockJob:
    """One block to compress: the model's block, its targets, its inputs and what to call."""

    original: nn.Module  # the model's block; `on_group` replaces its targets
    prefix: str  # the block's name in the model, with a trailing dot
    local: list[str]  # its targets' names inside it
    hidden: list[torch.Tensor]  # per batch: (batch, seq, hidden) inputs
    inputs: BlockInputs  # per batch: the other arguments
    dtype: torch.dtype
    on_group: GroupCallback
    output_grams: bool
    device: torch.device | None = None  # where the copies run (None: where the model is)

    def copy(self) -> tuple[nn.Module, set[str]]:
        """A copy in the calibration dtype, and the targets that gather output grams there."""
        copy = cast_copy(self.original, self.dtype, self.device)
        return copy, narrow_targets(copy, self.local, self.output_grams)

    def factorize(self, names: list[str], stats: dict[str, LayerStats]) -> None:
        self.on_group([self.prefix + n for n in names], {self.prefix + n: stats[n] for n in names})


def compress_block_in_stages(job: BlockJob, need_outputs: bool = True) -> list[torch.Tensor] | None:
    """Factorize one block's targets group by group (`job.on_group` changes the block); returns
    the compressed block's outputs ([] unless `need_outputs`), or None where the block cannot be
    staged (then nothing changed)."""
    copy, narrow = job.copy()
    hidden, inputs = job.hidden, job.inputs
    with torch.inference_mode():
        groups = probe_groups(copy, job.local, (hidden[0], inputs.args[0], inputs.kwargs[0]))
    if groups is None:
        return None
    groups = join_last(groups)
    cursor = _Cursor()
    for group in groups:
        stage = _Stage(copy, group, narrow)
        with torch.inference_mode():
            stats = stage.run(inputs, hidden, cursor)
        job.factorize(group.names, stats)
        for name in group.names:
            compressed = job.original.get_submodule(name)
            set_module(copy, name, cast_copy(compressed, job.dtype, job.device))
        with torch.inference_mode():
            replay = stage.replay(cursor)
        if replay is not None:
            set_module(copy, group.parent, replay)
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for index, batch in enumerate(hidden if need_outputs else []):
            cursor.batch = index
            outputs.append(block_output(copy(batch, *inputs.args[index], **inputs.kwargs[index])))
    return outputs


@dataclass
class BlockProgress:
    """Where a sequential pass starts (a resumed run: after the last finished block, with that
    block's outputs) and who hears of each finished block (to checkpoint it)."""

    start: int = 0  # the first block to run
    hidden: list[torch.Tensor] | None = None  # per batch: block `start`'s inputs, if resumed
    # (block index, its outputs = the next block's inputs) after each block holding targets
    block_done: Callable[[int, list[torch.Tensor]], None] | None = None


def compress_sequential(
    model: nn.Module,
    names: list[str],
    windows: torch.Tensor,
    dtype: torch.dtype,
    on_group: GroupCallback,
    output_grams: bool = False,
    batch_size: int = 4,
    staged: bool = True,
    device: torch.device | None = None,
    progress: BlockProgress | None = None,
) -> None:
    """Sequential calibration and factorization of every target, block by block: in stages,
    or (`staged=False`, and for blocks that cannot be staged) dense grams then recompute."""
    progress = progress or BlockProgress()
    list_name, blocks = find_blocks(model, names)
    used = used_blocks(model, names)
    inputs = capture_inputs(model, blocks[0], windows, batch_size, dtype, device=device)
    hidden = inputs.hidden
    if progress.hidden is not None:  # resumed: the saved inputs of the first block to run
        hidden = [h.to(device) if device is not None else h for h in progress.hidden]
    for index in range(progress.start, used[-1] + 1):
        release_freed_memory()  # the last block's copies, grams and outputs
        prefix = f"{list_name}.{index}."
        local = [n[len(prefix) :] for n in names if n.startswith(prefix)]
        outputs = None
        if local:
            job = BlockJob(
                blocks[index], prefix, local, hidden, inputs, dtype, on_group, output_grams, device
            )
            if staged:
                outputs = compress_block_in_stages(job, need_outputs=index < used[-1])
            if outputs is None:  # not staged: dense grams, then the compressed block's outputs
                outputs = _dense_then_compressed(job)
            if progress.block_done is not None:
                progress.block_done(index, outputs)
        elif index < used[-1]:
            with torch.inference_mode():
                outputs = forward_all(cast_copy(blocks[index], dtype, device), hidden, inputs)
        hidden = outputs if outputs is not None else hidden


def _dense_then_compressed(job: BlockJob) -> list[torch.Tensor]:
    copy, narrow = job.copy()
    collector = GramCollector(copy, job.local, narrow)
    try:
        with torch.inference_mode():
            forward_all(copy, job.hidden, job.inputs)
    finally:
        collector.remove()
    job.factorize(job.local, collector.stats())
    with torch.inference_mode():
        compressed = cast_copy(job.original, job.dtype, job.device)
        return forward_all(compressed, job.hidden, job.inputs)
