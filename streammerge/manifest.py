"""Resumable state and the manifest.

While a merge runs, every finished shard in ``OUT/.streammerge-partial/`` gets a record
``<shard>.done.json`` (written after the shard's fsync, atomically): the shard's fingerprint, size
and sha256. A rerun of the same command keeps the shards whose record matches and redoes the rest.

The fingerprint of a shard covers everything its bytes depend on: the base shard (name, size,
mtime, header), each tensor's output dtype and shape, every delta (adapter weights file identity,
module, keys, scale), the device kind and the chunk size, and the streammerge version. Changing
any input or option invalidates the record.

The manifest ``streammerge.json`` is written last, after the index: a directory without it is not
a finished merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from . import __version__, pagecache
from .checkpoint import ShardWriter, pread_into
from .errors import OutputError
from .plantypes import MergePlan

MANIFEST_NAME = "streammerge.json"
MANIFEST_FORMAT = "streammerge-manifest/1"
RECORD_SUFFIX = ".done.json"
HASH_BLOCK = 8 * 1024**2


def _file_identity(path: Path) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _shard_identity(plan: MergePlan, shard: str) -> dict[str, Any]:
    """A local shard by its file; a Hub shard by repo, commit and name (the file may not be here yet)."""
    if plan.base.origin is not None:
        return {"hub": plan.base.origin, "file": shard, "data_size": plan.base.shards[shard].data_size}
    return _file_identity(plan.base.shards[shard].path)


def _adapter_file_identity(plan: MergePlan, path: Path) -> dict[str, Any]:
    """An adapter file by repo, commit and name when it came from the Hub (it may sit in a fresh
    temporary folder on every run), else by the file itself."""
    for adapter in plan.adapters:
        if adapter.origin is not None and path == adapter.weights_path:
            return {"hub": adapter.origin, "file": path.name}
    return _file_identity(path)


def shard_fingerprint(plan: MergePlan, shard: str, *, device: str, chunk: int) -> str:
    header = plan.base.shards[shard]
    doc = {
        "streammerge": __version__,
        "device": device,
        "chunk": chunk,
        "base": _shard_identity(plan, shard),
        "metadata": header.metadata,
        "tensors": [
            [t.name, t.info.dtype, t.out_dtype, list(t.info.shape), t.info.begin,
             [[_adapter_file_identity(plan, d.adapter.weights_path), d.lora.a_key, d.lora.b_key, d.lora.magnitude_key, d.lora.bias_key,
               repr(d.scale), d.transposed, d.vector, d.expert, d.rows]
              for d in t.deltas],
             t.source and [_adapter_file_identity(plan, t.source.path), t.source.info.dtype, t.source.info.begin],
             t.tokens and [_adapter_file_identity(plan, t.tokens.adapter.weights_path), t.tokens.key,
                           list(t.tokens.ids)]]
            for t in plan.shards[shard]
        ],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


class Cancelled(Exception):
    """A checksum abandoned because the merge is stopping."""


def sha256_file(path: Path, *, cancelled: Callable[[], bool] = lambda: False) -> str:
    h = hashlib.sha256()
    buf = memoryview(bytearray(HASH_BLOCK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if cancelled():
                raise Cancelled(path)
            h.update(buf[:n])
            pagecache.drop(f.fileno(), f.tell() - n, n)  # read once: do not let the page cache keep it
    return h.hexdigest()


def sha256_while_written(writer: ShardWriter, *, cancelled: Callable[[], bool]) -> str:
    """The sha256 of a shard still being written, read right behind the writer (from the page cache)
    in file order: the hash is done moments after the last write instead of one read after the fsync."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(HASH_BLOCK))
    done = 0
    fd = os.open(writer.path, os.O_RDONLY)
    try:
        while done < writer.size:
            with writer.changed:
                writer.changed.wait_for(lambda: writer.prefix > done or writer.committed or cancelled(), timeout=0.5)
                ready = writer.size if writer.committed else writer.prefix
            if cancelled():
                raise Cancelled(writer.path)
            while done < ready:
                n = min(HASH_BLOCK, ready - done)
                pread_into(fd, done, buf[:n], path=writer.path)
                h.update(buf[:n])
                _read_behind(fd, done, n)
                done += n
    finally:
        os.close(fd)
    return h.hexdigest()


def _read_behind(fd: int, start: int, length: int) -> None:
    """The checksum has read ``[start, start+length)``: drop it, and again the range read DROP_LAG
    earlier, whose pages were still being written back then and are clean by now."""
    pagecache.drop(fd, start, length)
    if start >= pagecache.DROP_LAG:
        pagecache.drop(fd, start - pagecache.DROP_LAG, length)


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write, fsync, rename: a reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from None


def record_shard(staging: Path, shard: str, *, fingerprint: str) -> dict[str, Any]:
    """Right after a shard's fsync: its fingerprint and size, so that a rerun can keep it."""
    record = {"shard": shard, "fingerprint": fingerprint, "size": (staging / shard).stat().st_size, "sha256": None}
    write_json_atomic(staging / (shard + RECORD_SUFFIX), record)
    return record


def add_checksum(staging: Path, record: dict[str, Any], *, cancelled: Callable[[], bool] = lambda: False) -> None:
    """Read a finished shard back once and add its sha256 to its record (a shard resumed unhashed)."""
    set_checksum(staging, record, sha256_file(staging / record["shard"], cancelled=cancelled))


def set_checksum(staging: Path, record: dict[str, Any], sha256: str) -> None:
    record["sha256"] = sha256
    write_json_atomic(staging / (record["shard"] + RECORD_SUFFIX), record)


def drop_cached(path: Path) -> None:
    """Let the page cache drop a finished, fsynced file (it is not read again by this run)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pagecache.drop(fd)
    finally:
        os.close(fd)


def reusable_shards(staging: Path, fingerprints: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Records of staged shards that a rerun may keep; everything else in staging is removed."""
    kept: dict[str, dict[str, Any]] = {}
    if not staging.is_dir():
        return kept
    for shard, fingerprint in fingerprints.items():
        record_path, path = staging / (shard + RECORD_SUFFIX), staging / shard
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(record, dict) and record.get("fingerprint") == fingerprint and path.is_file()
                and path.stat().st_size == record.get("size")):
            kept[shard] = record
    keep = set(kept) | {s + RECORD_SUFFIX for s in kept} | {".lock"}  # the run's own lock stays
    for entry in staging.iterdir():
        if entry.name not in keep:
            if entry.is_dir():
                import shutil

                shutil.rmtree(entry)
            else:
                entry.unlink()
    return kept


def build_manifest(plan: MergePlan, records: dict[str, dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "streammerge": __version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"path": plan.base.origin or str(plan.base.root.resolve()),
                 "shards": {s: _shard_identity(plan, s) for s in plan.base.shards}},
        "adapters": [{"path": a.origin or str(a.path.resolve()), "weight": a.weight,
                      "weights_file": _adapter_file_identity(plan, a.weights_path),
                      "modules": len(a.modules)} for a in plan.adapters],
        "options": options,
        "tensors_merged": sorted(t.name for t in plan.touched),
        "shards": {s: {"size": r["size"], "sha256": r["sha256"]} for s, r in sorted(records.items())},
    }


def read_manifest(output: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((output / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT else None
