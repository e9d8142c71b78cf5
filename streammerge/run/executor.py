"""The local executor: every output locked and resumed, then the base walked once, shard by shard,
each shard a ``ShardTask`` for the outputs that still need it, then every output finished.

Several outputs (N adapters -> N merged checkpoints) share the single pass: each base shard is
brought to disk once and opened once per output; the outputs share one set of chunk buffers (the
``Compute``), so the memory budget holds for N outputs as for one. While torch is still loading,
the next shard's untouched copies are queued too, so that the disk works through the import.
"""

from __future__ import annotations

from ..errors import DownloadError
from ..events import Events
from ..output.manifest import shard_fingerprint
from ..output.space import check_disk
from ..sources.fetch import HubShards, LocalShards, SharedShards
from ..sources.hub import HubBase
from .compute import Compute, ComputeSummary
from .merger import TensorMerger
from .task import ShardTask, Target

LOOKAHEAD = 1  # shards whose copies may be queued ahead while torch loads


class LocalExecutor:
    def __init__(self, compute: Compute, events: Events, *, source: LocalShards | HubShards,
                 hub_base: HubBase | None = None, low_disk: bool = False) -> None:
        self.compute, self.events = compute, events
        self.source, self.hub_base, self.low_disk = source, hub_base, low_disk
        self.merger = TensorMerger(compute)
        self.stats: ComputeSummary | None = None  # the compute's figures, for the report

    def run(self, targets: list[Target]) -> None:
        """Write every output; on failure keep only what a rerun can reuse, and re-raise."""
        try:
            self._prepare(targets)
            self._walk(targets)
            self._close(targets)  # the downloads' private folder goes before the outputs are published
            for target in targets:
                target.sink.finish()
        except BaseException as exc:
            if isinstance(exc, DownloadError):  # the writers are fine: let them fsync and record what is merged
                for target in targets:
                    _drain_quietly(target)
            self._close(targets)  # first: no write may still be pending when files are removed
            for target in targets:
                target.sink.fail(exc)
            raise
        finally:
            for target in targets:
                target.sink.close()

    def _prepare(self, targets: list[Target]) -> None:
        chunk = self.compute.working_set.chunk_elements
        for target in targets:
            plan = target.plan
            kept = target.sink.prepare(
                lambda shard, plan=plan: shard_fingerprint(plan, shard, device=self.compute.device_kind(), chunk=chunk))
            target.todo = [s for s in plan.shards if s not in kept]
        check_disk([t.sink for t in targets], self.hub_base, low_disk=self.low_disk)
        total = sum(t.plan.output_size for t in targets)
        done = sum(t.plan.shard_bytes(s) for t in targets for s in t.sink.kept)
        self.events.emit("plan", bytes=total, bytes_done=done, bytes_out=sum(t.sink.bytes_to_write() for t in targets),
                         outputs=[t.name for t in targets],
                         shards=len(targets[0].plan.shards) if targets else 0,
                         resumed={t.name: sorted(t.sink.kept) for t in targets})

    def _walk(self, targets: list[Target]) -> None:
        shared = SharedShards(self.source)
        todo = [set(t.todo) for t in targets]
        order = [s for s in targets[0].plan.shards if any(s in left for left in todo)] if targets else []
        opened: dict[str, ShardTask] = {}
        if order:
            shared.prefetch(order[0])  # downloads while torch loads
        for i, shard in enumerate(order):
            ahead = order[i : i + 1 + (0 if self.compute.ready() else LOOKAHEAD)]
            for j, name in enumerate(ahead, i):
                if name not in opened:
                    users = [t for t, left in zip(targets, todo) if name in left]
                    shared.expect(name, len(users))
                    shared.local(name)  # a Hub shard: downloaded (or waited for) now
                    if j + 1 < len(order):
                        shared.prefetch(order[j + 1])
                    opened[name] = ShardTask(name, users)
                    opened[name].open()
            task = opened.pop(shard)
            task.merge(self.merger)
            task.finish(shared.release)
        for target in targets:
            target.drain()
        self.compute.start()  # (a plan with nothing to compute still reports its device and baseline)
        self.stats = self.compute.summary()

    def _close(self, targets: list[Target]) -> None:
        for target in targets:
            target.stop()
        self.merger.close()
        self.compute.close()
        self.source.close()


def _drain_quietly(target: Target) -> None:
    try:
        target.io.drain()
    except Exception:  # the first error stays the one reported
        pass
