"""The streaming loop: one shard open at a time, one tensor at a time, one row chunk at a time.

Memory: see ``workingset.py``; several outputs in one pass share one set of buffers.

Threads: the merge thread reads and computes; one I/O thread writes chunks, copies untouched
tensors file to file in the kernel, and fsyncs finished shards, in submission order. torch (about
a second to import) loads in a third thread while the plan is built; on the CPU the first shard's
untouched tensors are already being copied before it is needed.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from tqdm import tqdm

from .checkpoint import ShardWriter, pread_into
from .fetch import HubShards, LocalShards, SharedShards
from .header import DTYPE_SIZES, SafetensorsHeader
from .iothread import IOThread
from .manifest import Cancelled, add_checksum, drop_cached, record_shard, set_checksum, sha256_while_written
from .memory import current_rss, format_size, reset_peak_rss
from .workingset import SLOTS, WorkingSet
from .plantypes import Delta, MergePlan, TensorPlan

if TYPE_CHECKING:
    from .kernels import Processor
    from .merge import MergeReport

log = logging.getLogger(__name__)

LOOKAHEAD = 1  # shards whose copies may be queued ahead while torch loads
EXPERT_CACHE = 4  # A and B of gate_up and of down


def count(report: MergeReport, t: TensorPlan) -> None:
    """One output tensor in the report: merged (LoRA or token rows), replaced, converted or copied."""
    if t.merged:
        report.tensors_merged += 1
    elif t.source is not None:
        report.tensors_replaced += 1
    elif t.rewritten:
        report.tensors_converted += 1
    else:
        report.tensors_copied += 1


def progress_bar(total: int, progress: bool) -> tqdm:
    """One bar over output bytes on stderr, only on a terminal."""
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merging", file=sys.stderr,
                disable=not (progress and sys.stderr.isatty()))


class Runtime:
    """Imports the torch side (``kernels``) in the background; ``get()`` waits for it."""

    def __init__(self) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._load, name="streammerge-import", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            importlib.import_module(f"{__package__}.kernels")
        except BaseException as exc:  # re-raised in the caller of get()
            self._error = exc

    def ready(self) -> bool:
        return not self._thread.is_alive()

    def get(self) -> ModuleType:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return sys.modules[f"{__package__}.kernels"]


class Engine:
    def __init__(self, plan: MergePlan, *, device: str, max_mem: int, runtime: Runtime) -> None:
        self.plan = plan
        # Set by the caller when needed: the source that brings Hub shards to disk (its owner closes
        # it), and what to do with each shard once fsynced, recorded and hashed (the upload).
        self.base_shards: LocalShards | HubShards | SharedShards = LocalShards()
        self.on_shard_done: Callable[[str, dict], None] | None = None
        self.max_mem = max_mem
        self.device_spec = device
        self.runtime = runtime
        self.kernels: ModuleType | None = None
        self.processor: Processor | None = None
        self.baseline_rss = 0
        self.working_set = WorkingSet.of(plan, max_mem)  # a budget too small is refused now, before any write
        self.io_itemsize, self.widest = self.working_set.io_itemsize, self.working_set.widest
        self.chunk = self.working_set.chunk_elements
        self.io = IOThread()
        self.hasher = IOThread()  # reads back finished shards for their sha256, off the write path
        self.records: dict[str, dict] = {}
        self._open: list[tuple[int, ShardWriter]] = []  # (source fd, writer) not yet closed
        self._source_fds: dict[Path, int] = {}  # adapter files that supply base weights
        self._cache: dict[tuple[int, str], object] = {}  # fused-expert factors (see _cached)
        self._opened: dict[str, tuple[int, ShardWriter]] = {}  # shard -> (source fd, writer) being written
        self._recorded: dict[str, threading.Event] = {}  # set when a shard's record is written
        self._checksum = True  # (set by begin)
        self._threads_before = 0  # torch's thread count before the merge (restored by close)
        self._group: list[Engine] = [self]  # engines sharing one set of buffers; the first owns them

    def share_buffers(self, others: list[Engine]) -> None:
        """Several outputs in one pass: one set of chunk buffers for all, sized for any of their plans
        (one tensor is merged at a time, whichever output it is for)."""
        group = [self, *others]
        ws = WorkingSet.combine([e.working_set for e in group], self.max_mem)
        for e in group:
            e.working_set, e._group = ws, group
            e.io_itemsize, e.widest, e.chunk = ws.io_itemsize, ws.widest, ws.chunk_elements

    def start_compute(self) -> None:
        """Wait for torch, resolve the device, reset the peak-RSS counter and allocate the buffers.

        The RSS at this point (interpreter + libraries + plan) is the baseline the budget sits on.
        """
        if self.processor is not None:
            return
        if self._group[0] is not self:  # borrow the owner's buffers
            owner = self._group[0]
            owner.start_compute()
            self.kernels, self.device, self.baseline_rss = owner.kernels, owner.device, owner.baseline_rss
            self.processor = owner.processor
            return
        self.kernels = k = self.runtime.get()
        self.device = k.resolve_device(self.device_spec)
        reset_peak_rss()
        self.baseline_rss = current_rss()
        self._threads_before = k.prepare_device(self.device, reserve=1 if self._checksum else 0)
        self.processor = self._processor(self.device, self.chunk)

    def _processor(self, device: object, capacity: int) -> Processor:
        log.info("chunk buffers on %s: %d elements (%s)", device, capacity,
                 format_size(capacity * (4 + SLOTS * self.io_itemsize)))
        assert self.kernels is not None
        return self.kernels.Processor(device, capacity=capacity, io_itemsize=self.io_itemsize, widest=self.widest,
                                      slots=SLOTS)

    def run(self, staging: Path, report: MergeReport, *, progress: bool, kept: dict[str, dict],
            fingerprints: dict[str, str], checksum: bool) -> None:
        """Write every shard not in ``kept`` into ``staging``; record each after its fsync."""
        with progress_bar(self.plan.output_size, progress) as bar:
            names = self.begin(staging, report, bar, kept=kept, fingerprints=fingerprints, checksum=checksum)
            if names:
                self.base_shards.prefetch(names[0])  # downloads while torch loads
            for i, shard in enumerate(names):
                # While torch is still loading, also queue the next shard's untouched copies, so
                # that the disk works through the import. At most LOOKAHEAD shards ahead.
                for j, ahead in enumerate(names[i : i + 1 + (0 if self.runtime.ready() else LOOKAHEAD)], i):
                    if ahead not in self._opened:
                        self.base_shards.local(ahead)  # a Hub shard: downloaded (or waited for) now
                        if j + 1 < len(names):
                            self.base_shards.prefetch(names[j + 1])
                        self.open(ahead)
                for t in self.plan.shards[shard]:
                    if t.rewritten:
                        self.rewrite(shard, t)
                self.finish(shard)
            self.drain()
        self.end()

    def begin(self, staging: Path, report: MergeReport, bar: tqdm, *, kept: dict[str, dict],
              fingerprints: dict[str, str], checksum: bool) -> list[str]:
        """Count the shards ``kept`` from an earlier run, set up recording; return the shards to write."""
        self.records = dict(kept)
        self._staging, self._report, self._bar, self._checksum = staging, report, bar, checksum
        for shard in kept:  # finished by an earlier run with the same inputs and options
            tensors = self.plan.shards[shard]
            bar.update(sum(t.info.numel * DTYPE_SIZES[t.out_dtype] for t in tensors))
            report.shards_resumed += 1
            report.shards += 1
            for t in tensors:
                count(report, t)

        def record(shard: str) -> None:  # on the I/O thread, right after the shard's fsync
            self.records[shard] = record_shard(staging, shard, fingerprint=fingerprints[shard])
            self._recorded[shard].set()  # the checksum (see open) adds its sha256 to this record
            if not checksum and self.on_shard_done is not None:
                self.hasher.submit(lambda: self.on_shard_done(shard, self.records[shard]))  # type: ignore[misc]

        self._record = record
        for kept_shard, kept_record in kept.items():  # an earlier run may have stopped before hashing
            if checksum and kept_record["sha256"] is None:
                self.hasher.submit(lambda r=kept_record: add_checksum(staging, r, cancelled=lambda: self.hasher.cancelled))
            if self.on_shard_done is not None:
                self.hasher.submit(lambda s=kept_shard, r=kept_record: self.on_shard_done(s, r))  # type: ignore[misc]
        return [s for s in self.plan.shards if s not in kept]

    def _checksum_while_written(self, shard: str, writer: ShardWriter) -> None:
        """On the hasher thread: hash the shard right behind its writes, then, once its record exists
        (after the fsync), add the sha256 to it and let its pages go."""
        cancelled = lambda: self.hasher.cancelled  # noqa: E731
        sha = sha256_while_written(writer, cancelled=cancelled)
        while not self._recorded[shard].wait(0.2):
            if cancelled():
                raise Cancelled(writer.path)
        record = self.records[shard]
        set_checksum(self._staging, record, sha)
        drop_cached(writer.path)
        if self.on_shard_done is not None:
            self.on_shard_done(shard, record)

    def open(self, shard: str) -> None:
        """Create the output shard and queue its untouched tensors' copies (no torch, no buffer)."""
        header = self.plan.base.shards[shard]
        tensors = self.plan.shards[shard]
        entries = [(t.name, t.out_dtype, t.info.shape) for t in tensors]
        src = os.open(header.path, os.O_RDONLY)
        writer = ShardWriter(self._staging / shard, entries, {**header.metadata, "format": "pt"},
                             followed=self._checksum)
        self._open.append((src, writer))
        self._opened[shard] = (src, writer)
        self._recorded[shard] = threading.Event()
        if self._checksum:
            self.hasher.submit(lambda: self._checksum_while_written(shard, writer))
        for t in tensors:
            if not t.rewritten:
                self.io.submit(lambda t=t: writer.copy_range(src, header.data_start + t.info.begin, t.name, t.info.nbytes))
                self._bar.update(t.info.nbytes)
                count(self._report, t)

    def rewrite(self, shard: str, t: TensorPlan) -> None:
        """Merge (or convert, or replace) one tensor of an open shard, chunk by chunk."""
        self.start_compute()
        src, writer = self._opened[shard]
        self._rewrite_with_fallback(t, src, self.plan.base.shards[shard], writer, self._bar, self._report)

    def finish(self, shard: str) -> None:
        """Every tensor of ``shard`` is queued: queue its fsync; its record follows on the I/O thread."""
        src, writer = self._opened.pop(shard)
        self._report.bytes_written += sum(t.info.numel * DTYPE_SIZES[t.out_dtype] for t in self.plan.shards[shard])
        self._report.shards += 1
        self.io.submit(lambda: (writer.commit(), self._record(shard)),
                       done=lambda: (self._closed(src, writer), self.base_shards.release(shard)))

    def drain(self) -> None:
        self.io.drain()  # every write, copy and fsync done, or its error raised here
        self.hasher.drain()  # every finished shard checksummed and recorded

    def end(self) -> None:
        self.start_compute()  # (a plan with nothing to compute still reports its device)
        assert self.kernels is not None and self.processor is not None
        report = self._report
        report.device = str(self.device)
        report.baseline_rss = self.baseline_rss
        report.chunk_elements = self.processor.capacity
        report.peak_gpu = self.kernels.peak_gpu(self.device)

    def _closed(self, src: int, writer: ShardWriter) -> None:
        """After a shard's commit ran (or was skipped): close its source; forget it once committed."""
        os.close(src)
        self._open.remove((src, writer))
        if not writer.committed:
            self._open.append((-1, writer))  # close() aborts it

    def _rewrite_with_fallback(
        self, t: TensorPlan, src: int, header: SafetensorsHeader, writer: ShardWriter, bar: tqdm,
        report: MergeReport,
    ) -> None:
        """Merge one tensor; on CUDA out-of-memory halve the chunk, and at one row move to the CPU."""
        while True:
            try:
                written = self._rewrite(t, src, header, writer)
                break
            except Exception as exc:
                assert self.kernels is not None and self.processor is not None
                if not self.kernels.is_cuda_oom(exc) or self.processor.device.type != "cuda":
                    raise
                self._shrink(t, report)
        bar.update(written)
        count(report, t)

    def _shrink(self, t: TensorPlan, report: MergeReport) -> None:
        assert self.kernels is not None and self.processor is not None
        old = self.processor
        capacity = old.capacity // 2
        old.close()
        if capacity >= self.widest:
            note = f"CUDA out of memory on {t.name}: chunk shrunk to {capacity} elements"
            self.processor = self._processor(old.device, capacity)
        else:
            note = f"CUDA out of memory on {t.name} even at one row: finishing the merge on the CPU"
            self.processor = self._processor(self.kernels.cpu_device(), self.chunk)
        for e in self._group:
            e.processor = self.processor
        log.warning(note)
        report.notes.append(note)

    def _rewrite(self, t: TensorPlan, src: int, header: SafetensorsHeader, writer: ShardWriter) -> int:
        assert self.kernels is not None and self.processor is not None
        proc = self.processor
        factors = [self._factors(d) for d in t.deltas]
        tokens = t.tokens and (proc.to_device(self.kernels.as_ids(t.tokens.ids)),
                               proc.to_device(t.tokens.adapter.load(t.tokens.key)))
        rows, cols = t.rows_cols
        step = max(1, proc.capacity // cols)
        origin = t.origin(self.plan.base)
        if t.source is not None:  # an adapter file holds this tensor's base weight
            src = self._source_fd(origin.path)
        src_item, out_item = DTYPE_SIZES[origin.info.dtype], DTYPE_SIZES[t.out_dtype]
        if any(f.magnitude is not None and f.transposed for f in factors):
            factors = self._column_dora(factors, src, origin, rows, cols, step)
        written = 0
        for row0 in range(0, rows, step):
            n = min(step, rows - row0)
            slot = proc.acquire()
            try:
                self.io.check()
                offset = origin.data_start + origin.info.begin + row0 * cols * src_item
                pread_into(src, offset, proc.raw_bytes(slot, n * cols, src_item), path=origin.path)
                out = proc.merge_rows(slot, src_dtype=origin.info.dtype, out_dtype=t.out_dtype, row0=row0, rows=n,
                                      cols=cols, factors=factors, tensor=t.name, tokens=tokens)
                self.io.submit(lambda at=row0 * cols * out_item, out=out: writer.write(t.name, at, out),
                               done=slot.free.set)
            except BaseException:
                slot.free.set()
                raise
            written += len(out)
        return written

    def _column_dora(self, factors: list, src: int, origin: object, rows: int, cols: int, step: int) -> list:
        """DoRA on Conv1D / Embedding scales columns by m / ||column of W + dW||: a first pass over
        every row chunk accumulates the column norms (float64), then the merge pass uses them."""
        import dataclasses

        proc, k = self.processor, self.kernels
        assert proc is not None and k is not None
        acc = k.zeros64(cols, proc.device)
        item = DTYPE_SIZES[origin.info.dtype]  # type: ignore[attr-defined]
        for row0 in range(0, rows, step):
            n = min(step, rows - row0)
            slot = proc.acquire()
            try:
                offset = origin.data_start + origin.info.begin + row0 * cols * item  # type: ignore[attr-defined]
                pread_into(src, offset, proc.raw_bytes(slot, n * cols, item), path=origin.path)  # type: ignore[attr-defined]
                proc.column_sumsq(slot, src_dtype=origin.info.dtype, row0=row0, rows=n, cols=cols,  # type: ignore[attr-defined]
                                  factors=factors, acc=acc)
            finally:
                slot.free.set()
        return [dataclasses.replace(f, column_scale=(f.magnitude.double() / acc.sqrt()).float())
                if f.magnitude is not None and f.transposed else f for f in factors]

    def _factors(self, d: Delta) -> object:
        proc, load = self.processor, d.adapter.load
        assert self.kernels is not None and proc is not None
        if d.vector:  # lora_bias: (out,)
            return self.kernels.Factors(None, proc.to_device(load(d.lora.bias_key)), d.scale, vector=True)
        if d.expert >= 0:  # one expert's slice of fused factors, loaded once per layer
            a, b = d.select(self._cached(d.adapter, d.lora.a_key), self._cached(d.adapter, d.lora.b_key))
            return self.kernels.Factors(proc.to_device(a), proc.to_device(b), d.scale)
        return self.kernels.Factors(
            proc.to_device(load(d.lora.a_key)),  # (r, in)
            proc.to_device(load(d.lora.b_key)),  # (out, r)
            d.scale, d.transposed,
            proc.to_device(load(d.lora.magnitude_key)) if d.lora.magnitude_key else None)

    def _cached(self, adapter: object, key: str) -> object:
        """Fused-expert factors: the last EXPERT_CACHE tensors read stay (gate_up and down alternate)."""
        entry = (id(adapter), key)
        if entry not in self._cache:
            while len(self._cache) >= EXPERT_CACHE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[entry] = adapter.load(key)  # type: ignore[attr-defined]
        return self._cache[entry]

    def _source_fd(self, path: Path) -> int:
        if path not in self._source_fds:
            self._source_fds[path] = os.open(path, os.O_RDONLY)
        return self._source_fds[path]

    def close(self) -> None:
        """Stop the I/O thread (skipping what a failure left queued), then free and close everything."""
        self.io.stop()
        self.hasher.stop()
        if self.processor is not None and self._group[0] is self:
            self.processor.close()
            if self.kernels is not None and self._threads_before:
                self.kernels.set_threads(self._threads_before)  # the caller's torch setting back
        self.processor = None
        for src, writer in self._open:
            if src >= 0:
                os.close(src)
            writer.abort()
        self._open.clear()
        for fd in self._source_fds.values():
            os.close(fd)
        self._source_fds.clear()
