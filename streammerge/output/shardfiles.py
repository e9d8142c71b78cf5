"""The sink of one worker of a spread merge (``--ray-shards``): some shards of an output whose
staging area another process (the driver) owns, locks, cleans and publishes.

It writes only its own files: each shard under a name unique to this attempt
(``.<shard>.<attempt>.part``), fsynced, hashed, renamed to ``<shard>`` and then recorded
(``<shard>.done.json``, the record a local merge writes, so a rerun resumes either way). A worker
declared dead that is still writing has another attempt's name: it cannot clobber its retry's file,
and a late rename of its own is the same bytes. It never removes a file it did not create.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..formats.shardwriter import ShardWriter
from ..plan.types import MergePlan
from ..sources.fetch import FETCH_DIR
from .checksum import sha256_file
from .directory import STAGING
from .manifest import RECORD_SUFFIX, write_json_atomic


class ShardFilesSink:
    def __init__(self, plan: MergePlan, out: Path, shards: list[str], *, checksum: bool) -> None:
        unknown = sorted(set(shards) - set(plan.shards))
        if unknown:
            raise OutputError(f"{out}: shard(s) {', '.join(unknown)} are not in the base's plan")
        self.plan, self.out, self.mine = plan, out, list(shards)
        self.staging = out / STAGING
        self.fetch_dir = self.staging / FETCH_DIR  # (the Sink protocol's; no --low-disk on a cluster)
        self.checksum = checksum
        self.attempt = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
        self.kept: dict[str, dict[str, Any]] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self._fingerprint: Callable[[str], str] = lambda shard: ""
        self._writers: dict[str, ShardWriter] = {}

    def prepare(self, fingerprint: Callable[[str], str]) -> dict[str, dict[str, Any]]:
        """Every shard that is not this worker's counts as kept (not written here)."""
        if not self.staging.is_dir():
            raise OutputError(f"{self.staging}: the staging area is gone (the driver owns it; is the output on a "
                              "filesystem shared by every node, at the same path?)")
        self._fingerprint = fingerprint
        self.kept = {s: {} for s in self.plan.shards if s not in self.mine}
        return self.kept

    def bytes_to_write(self) -> int:
        return sum(self.plan.shard_bytes(s) for s in self.mine)

    def extra_bytes(self) -> int:
        return 0

    def held_bytes(self) -> int:
        return 0

    def open_shard(self, shard: str) -> ShardWriter:
        header = self.plan.base.shards[shard]
        entries = [(t.name, t.out_dtype, t.info.shape) for t in self.plan.shards[shard]]
        writer = ShardWriter(self.staging / f".{shard}.{self.attempt}.part", entries,
                             {**header.metadata, "format": "pt"})
        self._writers[shard] = writer
        return writer

    def commit_shard(self, shard: str) -> None:
        """fsync, hash, rename into place, then the record (the rename first: a record always names
        a complete file)."""
        writer = self._writers[shard]
        writer.commit()
        sha = sha256_file(writer.path) if self.checksum else None
        final = self.staging / shard
        os.replace(writer.path, final)
        record = {"shard": shard, "fingerprint": self._fingerprint(shard), "size": final.stat().st_size,
                  "sha256": sha}
        write_json_atomic(self.staging / (shard + RECORD_SUFFIX), record)
        self.records[shard] = record

    def closed_shard(self, shard: str) -> None:
        if self._writers[shard].committed:
            del self._writers[shard]

    def drain(self) -> None:
        pass

    def finish(self) -> None:
        pass  # (the driver publishes)

    def fail(self, exc: BaseException) -> None:
        self.close()

    def close(self) -> None:
        for writer in self._writers.values():
            if not writer.committed:
                writer.abort()  # (only this attempt's own .part file)
        self._writers.clear()
