"""One base shard's work for every output that still needs it: source -> decode -> deltas ->
encode -> sink. The local executor runs these in order, in lockstep over N outputs; the unit is
what another executor could run elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..events import Events
from ..plan.types import MergePlan, TensorPlan
from .iothread import IOThread

if TYPE_CHECKING:
    from ..output.sink import ShardOut, Sink
    from .merger import TensorMerger


def tensor_kind(t: TensorPlan) -> str:
    """What happens to one output tensor: merged (deltas or token rows), replaced, converted, copied."""
    if t.merged:
        return "merged"
    if t.source is not None:
        return "replaced"
    return "converted" if t.rewritten else "copied"


class Target:
    """One output being written: its plan, its sink, and its own I/O thread (writes, kernel copies
    and fsyncs in submission order, so that writes to several outputs proceed in parallel)."""

    def __init__(self, plan: MergePlan, sink: Sink, events: Events) -> None:
        self.plan, self.sink, self.events = plan, sink, events
        self.name = str(sink.out)
        self.io = IOThread()
        self.todo: list[str] = list(plan.shards)
        self._open: dict[str, tuple[int, ShardOut]] = {}  # shard -> (base shard fd, writer)

    def opened(self, shard: str) -> tuple[int, ShardOut]:
        return self._open[shard]

    def open(self, shard: str) -> None:
        """Create the output shard and queue its untouched tensors' copies (no torch, no buffer)."""
        header = self.plan.base.shards[shard]
        src = os.open(header.path, os.O_RDONLY)
        try:
            writer = self.sink.open_shard(shard)
        except BaseException:
            os.close(src)
            raise
        self._open[shard] = (src, writer)
        self.events.emit("shard_started", self.name, shard=shard)
        for t in self.plan.shards[shard]:
            if not t.rewritten:
                self.io.submit(lambda t=t: writer.copy_range(src, header.data_start + t.info.begin, t.name, t.info.nbytes))
                self.events.emit("tensor", self.name, name=t.name, kind="copied", bytes=t.info.nbytes)

    def finish(self, shard: str, release: Callable[[str], None]) -> None:
        """Every tensor of ``shard`` is queued: queue its fsync and record; then close its source."""
        src, _ = self._open[shard]
        size = self.plan.shard_bytes(shard)

        def commit() -> None:
            self.sink.commit_shard(shard)
            self.events.emit("shard_done", self.name, shard=shard, bytes=size)

        def closed() -> None:
            os.close(src)
            del self._open[shard]
            self.sink.closed_shard(shard)
            release(shard)

        self.io.submit(commit, done=closed)

    def drain(self) -> None:
        self.io.drain()  # every write, copy and fsync done, or its error raised here
        self.sink.drain()

    def stop(self) -> None:
        """Skip what a failure left queued, then close what is still open (shards stay uncommitted)."""
        self.io.stop()
        for src, _ in self._open.values():
            os.close(src)
        self._open.clear()


class ShardTask:
    """``shard`` for each of ``targets``: open every output shard (untouched tensors copied), then
    each rewritten tensor for every output that changes it before the next tensor is read (so its
    bytes come from the disk once and from the page cache after), then commit."""

    def __init__(self, shard: str, targets: list[Target]) -> None:
        self.shard, self.targets = shard, targets

    def open(self) -> None:
        for target in self.targets:
            target.open(self.shard)

    def merge(self, merger: TensorMerger) -> None:
        rewritten = [{t.name: t for t in target.plan.shards[self.shard] if t.rewritten and t.written_by is None}
                     for target in self.targets]  # (a re-quantized weight writes its scale tensor itself)
        for name in dict.fromkeys(n for tensors in rewritten for n in tensors):
            for target, tensors in zip(self.targets, rewritten):
                if name in tensors:
                    merger.rewrite(target, self.shard, tensors[name])

    def finish(self, release: Callable[[str], None]) -> None:
        for target in self.targets:
            target.finish(self.shard, release)
