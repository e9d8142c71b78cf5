"""sha256 of output shards: read right behind the writer (from the page cache) while a shard is
written, or once afterwards for a shard resumed unhashed; either way the pages are dropped once read."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..formats import pagecache
from ..formats.checkpoint import pread_into
from ..formats.shardwriter import ShardWriter
from .manifest import set_checksum

HASH_BLOCK = 8 * 1024**2


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


def add_checksum(staging: Path, record: dict[str, Any], *, cancelled: Callable[[], bool] = lambda: False) -> None:
    """Read a finished shard back once and add its sha256 to its record (a shard resumed unhashed)."""
    set_checksum(staging, record, sha256_file(staging / record["shard"], cancelled=cancelled))


def drop_cached(path: Path) -> None:
    """Let the page cache drop a finished, fsynced file (it is not read again by this run)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pagecache.drop(fd)
    finally:
        os.close(fd)
