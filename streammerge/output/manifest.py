"""Resumable state and the manifest.

While a merge runs, every finished shard in ``OUT/.streammerge-partial/`` gets a record
``<shard>.done.json`` (written after the shard's fsync, atomically): the shard's fingerprint, size
and sha256. A rerun of the same command keeps the shards whose record matches and redoes the rest.

The fingerprint of a shard covers everything its bytes depend on: the base shard (name, size,
mtime, header), each tensor's output dtype and shape, every delta (adapter weights file identity,
module, keys, scale), the device kind the merge ran on (cpu or cuda, resolved: ``--device auto``
and ``--device cpu`` on a machine without CUDA are the same) and the chunk size, and the
streammerge version. Changing any input or option invalidates the record.

The manifest ``streammerge.json`` is written last, after the index: a directory without it is not
a finished merge.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import OutputError
from ..plan.types import MergePlan

MANIFEST_NAME = "streammerge.json"
MANIFEST_FORMAT = "streammerge-manifest/1"
RECORD_SUFFIX = ".done.json"


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
               repr(d.scale), d.method, d.expert, d.rows, *([list(d.lora.keys)] if d.lora.keys else [])]
              for d in t.deltas],
             t.source and [_adapter_file_identity(plan, t.source.path), t.source.info.dtype, t.source.info.begin],
             t.tokens and [_adapter_file_identity(plan, t.tokens.adapter.weights_path), t.tokens.key,
                           list(t.tokens.ids)],
             t.quant and [t.quant.scheme, list(t.quant.params),
                          sorted((k, _file_identity(s.path), s.info.name, s.info.dtype, s.info.begin)
                                 for k, s in t.quant.side.items())]]
            for t in plan.shards[shard]
        ],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write, fsync, rename: a reader sees the old file or the whole new one, never a part. The
    temporary name is the writer's own (two processes may record the same shard at once)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
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


def set_checksum(staging: Path, record: dict[str, Any], sha256: str) -> None:
    record["sha256"] = sha256
    write_json_atomic(staging / (record["shard"] + RECORD_SUFFIX), record)


def staged_shards(staging: Path, shards: list[str]) -> dict[str, dict[str, Any]]:
    """The records of staged shards whose file is complete, read only (nothing checked or removed):
    what an earlier run left, for a free-space estimate made before the staging area is locked."""
    found: dict[str, dict[str, Any]] = {}
    for shard in shards if staging.is_dir() else []:
        try:
            record = json.loads((staging / (shard + RECORD_SUFFIX)).read_text(encoding="utf-8"))
            if isinstance(record, dict) and (staging / shard).stat().st_size == record.get("size"):
                found[shard] = record
        except (OSError, ValueError):
            continue
    return found


def reusable_shards(staging: Path, shards: list[str], fingerprint: Callable[[str], str]) -> dict[str, dict[str, Any]]:
    """Records of staged shards that a rerun may keep; everything else in staging is removed.
    ``fingerprint`` is asked only for shards that have a record (it may have to wait for torch)."""
    kept: dict[str, dict[str, Any]] = {}
    if not staging.is_dir():
        return kept
    for shard in shards:
        record_path, path = staging / (shard + RECORD_SUFFIX), staging / shard
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(record, dict) and path.is_file() and path.stat().st_size == record.get("size")
                and record.get("fingerprint") == fingerprint(shard)):
            kept[shard] = record
    keep = set(kept) | {s + RECORD_SUFFIX for s in kept} | {".lock"}  # the run's own lock stays
    for entry in staging.iterdir():
        if entry.name not in keep:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return kept


def build_manifest(plan: MergePlan, records: dict[str, dict[str, Any]], options: dict[str, Any],
                   files: list[str]) -> dict[str, Any]:
    """``files``: everything the merge puts into the output besides the manifest itself (a later
    ``--overwrite`` removes exactly those the new merge does not write)."""
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
        "excluded": plan.excluded,
        "shards": {s: {"size": r["size"], "sha256": r["sha256"]} for s, r in sorted(records.items())},
        "files": sorted(files),
    }


def written_files(manifest: dict[str, Any]) -> list[str]:
    """What an earlier merge wrote into its output: its list, or (older manifests) its shards and index."""
    listed = manifest.get("files")
    if isinstance(listed, list) and all(isinstance(f, str) for f in listed):
        return [*listed, MANIFEST_NAME]
    shards = manifest.get("shards")
    names = list(shards) if isinstance(shards, dict) else []
    return [*names, "model.safetensors.index.json", MANIFEST_NAME]


def read_manifest(output: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((output / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT else None
