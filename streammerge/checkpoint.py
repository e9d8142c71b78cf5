"""Base checkpoints on disk: the index, shard headers, reading byte ranges, writing shards.

Everything here validates before it reads data: the index and every shard header are checked
when the checkpoint is opened, so a broken base fails before a single output byte is written.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from . import pagecache
from .errors import InputError, OutputError
from .header import SafetensorsHeader, TensorInfo, encode_header, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
COPY_BLOCK = 8 * 1024**2  # bounce buffer where the kernel cannot copy file to file
COPY_STEP = 64 * 1024**2  # untouched tensors are copied, and handed to writeback, in these pieces


@dataclass(frozen=True)
class BaseCheckpoint:
    """A validated base: shard headers in index order and the tensor -> shard map."""

    root: Path
    shards: dict[str, SafetensorsHeader]  # shard file name -> header
    weight_map: dict[str, str]  # tensor name -> shard file name
    index_metadata: dict[str, Any] | None  # None for a single-file checkpoint
    config: dict[str, Any] = field(default_factory=dict)  # config.json ({} when absent or unreadable)
    origin: str | None = None  # "org/name@commit" for a Hub base whose shards are fetched when needed

    @property
    def model_type(self) -> str | None:
        value = self.config.get("model_type")
        return value if isinstance(value, str) else None

    @property
    def ties_embeddings(self) -> bool:
        """tie_word_embeddings, at the top level or in text_config (VLMs); transformers' default is True."""
        text = self.config.get("text_config")
        for cfg in ((text if isinstance(text, dict) else {}), self.config):
            if "tie_word_embeddings" in cfg:
                return bool(cfg["tie_word_embeddings"])
        return True

    @property
    def sharded(self) -> bool:
        return self.index_metadata is not None

    def info(self, name: str) -> TensorInfo:
        return self.shards[self.weight_map[name]].tensors[name]

    @property
    def total_size(self) -> int:
        return sum(h.data_size for h in self.shards.values())


def _check_shard_name(name: Any, root: Path, index: Path) -> str:
    """Index shard names are untrusted: plain file names inside the base, ending .safetensors."""
    if not isinstance(name, str) or not name:
        raise InputError(f"{index}: shard name {name!r} is not a file name")
    if (
        os.path.isabs(name)
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or not name.endswith(".safetensors")
    ):
        raise InputError(
            f"{index}: shard name {name!r} is not allowed; shards must be plain "
            "'*.safetensors' file names inside the base directory"
        )
    return name


def check_inside(path: Path, root: Path) -> None:
    """A symlinked file must resolve inside ``root``, or into the Hugging Face cache's ``blobs/``
    of the same repo when ``root`` is one of its ``snapshots/<rev>`` directories."""
    target, top = path.resolve(), root.resolve()
    allowed = [top]
    if top.parent.name == "snapshots":
        allowed.append(top.parent.parent / "blobs")
    if not any(target.is_relative_to(a) for a in allowed):
        raise InputError(
            f"{path}: is a link to {target}, outside {root}; copy the file into the directory "
            "(links may only point inside it, or into a Hugging Face cache's blobs/)"
        )


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the index ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise InputError(f"{path}: the index has no 'weight_map' object; is it a safetensors index?")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: the index 'metadata' must be an object")
    root = path.parent
    weight_map = {
        str(tensor): _check_shard_name(shard, root, path) for tensor, shard in doc["weight_map"].items()
    }
    if not weight_map:
        raise InputError(f"{path}: the index lists no tensors")
    return weight_map, metadata


def _local_shard(root: Path, name: str) -> SafetensorsHeader:
    path = root / name
    if not path.is_file():
        raise InputError(f"base {root}: shard {name} listed in the index is missing")
    check_inside(path, root)
    return read_header(path)


def open_base(root: Path, *, read_shard: Callable[[str], SafetensorsHeader] | None = None,
              origin: str | None = None, remote_files: frozenset[str] = frozenset()) -> BaseCheckpoint:
    """Open a base directory (index + shards, or a single model.safetensors) and validate it.

    ``read_shard`` gives a shard's header by name (default: read ``root/name``); a Hub base passes
    one that reads cached shards locally and the others' headers remotely, with ``origin`` set and
    the repository's file names in ``remote_files``.
    """
    if not root.is_dir():
        raise InputError(f"base {root}: not a directory (pass the folder holding config.json)")
    index = root / INDEX_NAME
    if index.is_file():
        weight_map, metadata = _read_index(index)
        shard_names = list(dict.fromkeys(weight_map.values()))
    elif (root / SINGLE_NAME).is_file() or SINGLE_NAME in remote_files:
        weight_map, metadata, shard_names = {}, None, [SINGLE_NAME]
    else:
        found = sorted(p.name for p in root.glob("*.safetensors"))
        pickles = sorted(p.name for p in root.glob("pytorch_model*.bin"))
        hint = (f" (found {', '.join(found[:3])} but no index)" if found else
                f" (found {pickles[0]}: convert the checkpoint to safetensors first, e.g. load it with transformers "
                "and save_pretrained)" if pickles else "")
        raise InputError(
            f"base {root}: no {INDEX_NAME} or {SINGLE_NAME}{hint}; "
            "streammerge reads Hugging Face safetensors checkpoints"
        )
    shards = {name: (read_shard or (lambda n: _local_shard(root, n)))(name) for name in shard_names}
    if metadata is None:
        weight_map = {t: SINGLE_NAME for t in shards[SINGLE_NAME].tensors}
    for tensor, shard in weight_map.items():
        if tensor not in shards[shard].tensors:
            raise InputError(
                f"{root / shard}: tensor {tensor!r} is listed in the index but not in the shard"
            )
    return BaseCheckpoint(root, shards, weight_map, metadata, _config(root), origin)


def _config(root: Path) -> dict[str, Any]:
    """config.json, for the layout and tying rules ({} when absent or unreadable: no family rules)."""
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def pread_into(fd: int, offset: int, view: memoryview, *, path: Path) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short read means the file changed under us."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise InputError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


def read_tensor_bytes(header: SafetensorsHeader, name: str) -> bytearray:
    """One tensor's bytes, read whole (for small tensors: adapter factors)."""
    info = header.tensors[name]
    buf = bytearray(info.nbytes)
    fd = os.open(header.path, os.O_RDONLY)
    try:
        pread_into(fd, header.data_start + info.begin, memoryview(buf), path=header.path)
    finally:
        os.close(fd)
    return buf


def pwrite_all(fd: int, offset: int, data: memoryview, *, path: Path) -> None:
    done = 0
    while done < len(data):
        try:
            done += os.pwrite(fd, data[done:], offset + done)
        except OSError as exc:
            raise OutputError(f"{path}: write failed ({exc.strerror}); {_space_hint(path)}") from None


def _space_hint(path: Path) -> str:
    try:
        import shutil

        free = shutil.disk_usage(path.parent).free
        return f"{free} bytes free on that disk"
    except OSError:
        return "check the disk"


class ShardWriter:
    """Writes one output shard at ``<dir>/<name>``: header first, then data at fixed offsets.

    The file is fsynced and closed on ``commit()``; ``abort()`` closes and removes it.
    """

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str],
        *,
        followed: bool = False,
    ) -> None:
        self.path = path
        header, self.offsets = encode_header(entries, metadata)
        self.data_start = len(header)
        self.size = self.data_start + (max((e for _, e in self.offsets.values()), default=0))
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            raise OutputError(f"{path}: cannot create ({exc.strerror})") from None
        # Who drops the written pages (see ``_written``): a reader that follows the writer, else we.
        self._behind = None if followed else pagecache.Behind(self.fd)
        self.committed = False  # fsynced and closed: the file is complete
        self.closed = False
        # Ranges written so far, for a reader that follows the writer (the checksum): ``prefix`` bytes
        # from the start are all written; ``_pending`` holds later ranges (start -> end).
        self.prefix = 0
        self._pending: dict[int, int] = {}
        self.changed = threading.Condition()
        pwrite_all(self.fd, 0, memoryview(header), path=path)
        self._advance(0, len(header))

    def write(self, name: str, offset_in_tensor: int, data: memoryview) -> None:
        start = self.data_start + self.offsets[name][0] + offset_in_tensor
        pwrite_all(self.fd, start, data, path=self.path)
        self._written(start, len(data))

    def _written(self, start: int, length: int) -> None:
        """Hand a range just written to writeback, so that dirty pages never pile up for the final
        fsync and the disk writes while the merge computes. Its pages are dropped behind: by the
        reader that follows the writer (``followed``: the checksum), else here, a little later
        (see ``pagecache``)."""
        if self._behind is None:
            pagecache.start_writeback(self.fd, start, length)
        else:
            self._behind.written(start, length)
        self._advance(start, length)

    def _advance(self, start: int, length: int) -> None:
        if length == 0:
            return
        with self.changed:
            self._pending[start] = start + length
            while self.prefix in self._pending:
                self.prefix = self._pending.pop(self.prefix)
            self.changed.notify_all()

    def copy_range(self, src_fd: int, src_offset: int, name: str, nbytes: int) -> None:
        """Copy ``nbytes`` of an untouched tensor: in the kernel where possible, else via a small buffer.

        Copied in COPY_STEP pieces, each handed to writeback at once (see ``_written``).
        """
        dst = self.data_start + self.offsets[name][0]
        done = 0
        kernel = hasattr(os, "copy_file_range")
        bounce = memoryview(b"")
        while done < nbytes:
            step = min(COPY_STEP, nbytes - done)
            n = self._kernel_copy(src_fd, src_offset + done, dst + done, step) if kernel else 0
            if n == 0:  # no kernel copy here: through a small buffer instead
                kernel = False
                if not bounce:
                    bounce = memoryview(bytearray(min(COPY_BLOCK, nbytes)))
                n = min(len(bounce), step)
                pread_into(src_fd, src_offset + done, bounce[:n], path=self.path)
                pwrite_all(self.fd, dst + done, bounce[:n], path=self.path)
            self._written(dst + done, n)
            done += n

    def _kernel_copy(self, src_fd: int, src: int, dst: int, nbytes: int) -> int:
        """copy_file_range; 0 where the filesystem cannot (EXDEV, EINVAL, ENOSYS ...)."""
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, self.fd, nbytes - done, src + done, dst + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OutputError(f"{self.path}: disk full ({_space_hint(self.path)})") from None
            if done == 0:
                return 0
        return done

    def commit(self) -> None:
        """fsync, then drop the file's now-clean pages so the page cache does not grow with the output
        (not when a reader follows the writer: it drops them after reading)."""
        try:
            os.fsync(self.fd)
            if self._behind is not None:
                pagecache.drop(self.fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: flushing failed ({exc.strerror})") from None
        finally:
            os.close(self.fd)
            self.closed = True
        with self.changed:
            self.committed = True
            self.changed.notify_all()

    def abort(self) -> None:
        """Close and remove an uncommitted shard (call only once no write to it is pending)."""
        if not self.closed:
            os.close(self.fd)
            self.closed = True
        if not self.committed:
            self.path.unlink(missing_ok=True)
