"""The safetensors sink: one output directory, written as staged shards, resumable, published last.

A sink is what the shard task writes to (``Sink`` protocol): ``prepare`` (lock the staging area,
keep the shards an earlier run finished), per shard ``open_shard`` (a writer laid out from the
plan) and ``commit_shard`` (fsync, record, checksum), then ``finish`` (non-weight files, index,
manifest, publish) or ``fail`` (keep only what a rerun can reuse). A GGUF file would be a second
implementation of the same protocol.

Records: every finished shard gets ``<shard>.done.json`` beside it in the staging area, written
after its fsync (fingerprint and size), then completed with its sha256, which is computed on a
thread of its own right behind the writes (``checksum.py``).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..errors import DownloadError, Interrupted, OutputError
from ..formats.checkpoint import INDEX_NAME
from ..formats.shardwriter import ShardWriter
from ..plan.types import CONFIG_DTYPE_NAMES, MergePlan
from ..run.iothread import IOThread
from ..sources.fetch import FETCH_DIR
from ..codecs import QUANTIZATION_KEYS
from .card import CARD_NAME
from .checksum import Cancelled, add_checksum, drop_cached, sha256_while_written
from .directory import STAGING, foreign_weights, lock_output, publish
from .files import aux_files, copy_aux_files, copy_tokenizer, write_index
from .manifest import (MANIFEST_NAME, build_manifest, read_manifest, record_shard, reusable_shards, set_checksum,
                       write_json_atomic, written_files)
from .upload import Uploader



class ShardOut(Protocol):
    """Where one output shard's bytes go: merged ranges from the I/O thread, untouched tensors copied."""

    def write(self, name: str, offset_in_tensor: int, data: memoryview) -> None: ...

    def copy_range(self, src_fd: int, src_offset: int, name: str, nbytes: int) -> None: ...


class Sink(Protocol):
    """One output, as the executor sees it (see the module docstring for the order of the calls)."""

    out: Path
    plan: MergePlan
    kept: dict[str, dict[str, Any]]  # shards an earlier run finished, by prepare()
    fetch_dir: Path  # --low-disk with a Hub base (first output): where base shards are downloaded

    def prepare(self, fingerprint: Callable[[str], str]) -> dict[str, dict[str, Any]]: ...

    def bytes_to_write(self) -> int: ...  # tensor data this run writes (after prepare: what was kept is not)

    def extra_bytes(self) -> int: ...  # the files written beside it (config, tokenizer, ...)

    def held_bytes(self) -> int: ...  # memory it holds beside the working set's buffers

    def open_shard(self, shard: str) -> ShardOut: ...

    def commit_shard(self, shard: str) -> None: ...

    def closed_shard(self, shard: str) -> None: ...

    def drain(self) -> None: ...

    def finish(self) -> None: ...

    def fail(self, exc: BaseException) -> None: ...

    def close(self) -> None: ...


class SafetensorsSink:
    def __init__(self, plan: MergePlan, out: Path, *, checksum: bool, options: dict[str, Any],
                 card: Callable[[], str] | None = None, uploader: Uploader | None = None,
                 low_disk: bool = False) -> None:
        self.plan, self.out = plan, out
        self.staging = out / STAGING
        self.fetch_dir = self.staging / FETCH_DIR  # --low-disk: the base shards downloaded for this run
        self.checksum = checksum
        self.options = options  # recorded in the manifest
        self.card = card  # makes README.md, at the end (it imports huggingface_hub's card code: slow)
        self.uploader = uploader  # --push-to-hub: each shard once fsynced, recorded and hashed; one commit
        self.low_disk = low_disk  # with an uploader: nothing is kept locally
        self.pushed_to: str | None = None
        self.records: dict[str, dict[str, Any]] = {}
        self.kept: dict[str, dict[str, Any]] = {}
        self.files_copied: list[str] = []
        self.notes: list[str] = []
        self.tokenizer_note: str | None = None
        self.created = False
        self._lock = -1
        self._fingerprint: Callable[[str], str] = lambda shard: ""
        self._writers: dict[str, ShardWriter] = {}  # open or committed this run, not yet closed
        self._recorded: dict[str, threading.Event] = {}  # set when a shard's record is written
        self.hasher = IOThread()  # hashes shards right behind their writes, off the write path

    # 1. before any write
    def prepare(self, fingerprint: Callable[[str], str]) -> dict[str, dict[str, Any]]:
        """Lock the staging area; keep the shards an earlier run finished with the same fingerprint."""
        self.created = not self.out.exists()
        self._lock = lock_output(self.staging)
        self._fingerprint = fingerprint
        self.kept = reusable_shards(self.staging, list(self.plan.shards), fingerprint)
        self.records = dict(self.kept)
        for shard, record in self.kept.items():  # an earlier run may have stopped before hashing
            if self.checksum and record["sha256"] is None:
                self.hasher.submit(lambda r=record: add_checksum(self.staging, r, cancelled=lambda: self.hasher.cancelled))
            if self.uploader is not None:
                self.hasher.submit(lambda s=shard: self._shard_done(s))
        return self.kept

    def bytes_to_write(self) -> int:
        return self.plan.output_size - sum(self.plan.shard_bytes(s) for s in self.kept)

    def extra_bytes(self) -> int:
        base = self.plan.base.root
        return sum((base / f).stat().st_size for f in aux_files(base))

    def held_bytes(self) -> int:
        return 0  # (its buffers are the working set's)

    # 2. per shard
    def open_shard(self, shard: str) -> ShardWriter:
        header = self.plan.base.shards[shard]
        entries = [(t.name, t.out_dtype, t.info.shape) for t in self.plan.shards[shard]]
        writer = ShardWriter(self.staging / shard, entries, {**header.metadata, "format": "pt"},
                             followed=self.checksum)
        self._writers[shard] = writer
        self._recorded[shard] = threading.Event()
        if self.checksum:
            self.hasher.submit(lambda: self._checksum_while_written(shard, writer))
        return writer

    def commit_shard(self, shard: str) -> None:
        """On the I/O thread, after the shard's last write: fsync, then its record."""
        self._writers[shard].commit()
        self.records[shard] = record_shard(self.staging, shard, fingerprint=self._fingerprint(shard))
        self._recorded[shard].set()  # the checksum adds its sha256 to this record
        if not self.checksum and self.uploader is not None:
            self.hasher.submit(lambda: self._shard_done(shard))

    def closed_shard(self, shard: str) -> None:
        """After ``commit_shard`` ran (or was skipped by a failure): forget a committed writer."""
        if self._writers[shard].committed:
            del self._writers[shard]

    def _checksum_while_written(self, shard: str, writer: ShardWriter) -> None:
        """On the hasher thread: hash the shard right behind its writes, then, once its record exists
        (after the fsync), add the sha256 to it and let its pages go."""
        cancelled = lambda: self.hasher.cancelled  # noqa: E731
        sha = sha256_while_written(writer, cancelled=cancelled)
        while not self._recorded[shard].wait(0.2):
            if cancelled():
                raise Cancelled(writer.path)
        record = self.records[shard]
        set_checksum(self.staging, record, sha)
        drop_cached(writer.path)
        self._shard_done(shard)

    def _shard_done(self, shard: str) -> None:
        if self.uploader is not None:
            self.uploader.shard_ready(self.staging / shard, shard)

    def drain(self) -> None:
        self.hasher.drain()  # every finished shard checksummed and recorded

    # 3. at the end
    def stage_files(self) -> list[str]:
        """Non-weight files (config changes applied), the tokenizer, the card and the index into the
        staging area; returns what is published last before the manifest (the index)."""
        plan = self.plan
        self.files_copied = copy_aux_files(plan.base.root, self.staging,
                                           config_dtype=CONFIG_DTYPE_NAMES.get(plan.config_dtype or ""),
                                           config_changes=plan.config_changes,
                                           config_removed=QUANTIZATION_KEYS if plan.dequantized else ())
        if plan.tokenizer_from is not None:
            self._copy_tokenizer(plan.tokenizer_from)
        if self.card is not None:
            (self.staging / CARD_NAME).write_text(self.card(), encoding="utf-8")
            self.files_copied = sorted(set(self.files_copied) | {CARD_NAME})
        if not plan.base.sharded:
            return []
        write_index(self.staging, plan.base, plan.weight_map, plan.output_size)
        return [INDEX_NAME]

    def _copy_tokenizer(self, source: Path) -> None:
        copied = copy_tokenizer(source, self.staging)
        self.files_copied = sorted(set(self.files_copied) | set(copied))
        why = self.plan.tokenizer_why
        self.tokenizer_note = (f"{why}: tokenizer files {', '.join(copied)} taken from {source}" if copied else
                               f"{why} but {source} has no tokenizer files: the base's tokenizer was copied; make sure "
                               "it knows the new tokens")

    def finish(self) -> None:
        """Everything into ``out`` (the manifest last), or, with --push-to-hub --low-disk, into one Hub
        commit and nothing kept. Of an earlier merge in ``out`` (its manifest), the files this one
        does not write are removed; nothing else is."""
        last = self.stage_files()
        files = list(self.plan.shards) + self.files_copied + last
        write_json_atomic(self.staging / MANIFEST_NAME, build_manifest(self.plan, self.records, self.options, files))
        if self.uploader is not None:  # before publishing: a failed commit leaves a resumable staging area
            origin = self.plan.base.origin or self.plan.base.root.name
            self.pushed_to = self.uploader.commit(self.staging, self.files_copied + last + [MANIFEST_NAME],
                                                  message=f"Merge {len(self.plan.adapters)} adapter(s) into {origin} "
                                                  "(streammerge)")
            if self.low_disk:  # the shards were deleted once uploaded: nothing to publish here
                shutil.rmtree(self.staging, ignore_errors=True)
                self.notes.append(f"--low-disk with --push-to-hub: nothing kept in {self.out}; the merge is at "
                                  f"{self.pushed_to}")
                return
        self._publish(last)

    def _publish(self, last: list[str]) -> None:
        earlier = read_manifest(self.out)
        foreign = foreign_weights(self.out, ours=set(self.plan.shards) | set(last) |
                                  set(written_files(earlier) if earlier else []))
        if foreign:
            self.notes.append(f"{self.out} also holds weight files this merge did not write: {', '.join(foreign[:5])} "
                              "(kept; a loader that globs *.safetensors may pick them up)")
        publish(self.staging, self.out, first=list(self.plan.shards), middle=self.files_copied,
                last=last + [MANIFEST_NAME], earlier=written_files(earlier) if earlier else ())

    # on failure, and always at the end
    def abort_writes(self) -> None:
        """Stop the checksum and remove every shard not committed (no write may still be pending)."""
        self.hasher.stop()
        for writer in self._writers.values():
            writer.abort()
        self._writers.clear()

    def fail(self, exc: BaseException) -> None:
        """Keep the recorded shards when a rerun can resume them, else remove the staging area."""
        self.abort_writes()
        if self._lock < 0:
            return
        resumable = (KeyboardInterrupt, Interrupted, OutputError, DownloadError)
        if isinstance(exc, resumable) and self.records:
            reusable_shards(self.staging, list(self.plan.shards), self._fingerprint)  # no partial file stays
        else:
            shutil.rmtree(self.staging, ignore_errors=True)

    def close(self) -> None:
        self.abort_writes()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()  # failed before any shard, or --push-to-hub --low-disk: all on the Hub
