"""Page-cache hints for the shards we write: start their writeback early, drop their pages once used.

Two Linux calls, both hints (no-ops where the platform lacks them):
- ``start_writeback``: sync_file_range(SYNC_FILE_RANGE_WRITE) queues a range's dirty pages for
  writing without waiting and without dropping anything, so that dirty pages never pile up for
  the final fsync and the pages stay readable from memory;
- ``drop``: posix_fadvise(DONTNEED) also queues dirty pages, and drops the pages of the range that
  are clean. On a fast disk some of a range just written are already clean when the call reaches
  them: used right behind the writer it evicts pages that a reader following the writer (the
  checksum) must then read back from the disk (measured: 0.7-1.2 GB of 3.85 GB for one output,
  3.9 GB for four). So ranges are dropped behind: by the checksum once it has read them, or, with
  no checksum, by the writer DROP_LAG bytes of writes later (``Behind``). Dropping right behind the
  writer also cost kernel time: four outputs without checksums took 16.3-18.4 s (18-21 s system
  CPU) that way, 8.9-9.4 s (7 s) with ``Behind``.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from collections.abc import Callable

SYNC_FILE_RANGE_WRITE = 2
DROP_LAG = 64 * 1024**2  # a range written (or read) this much earlier is written back: drop it then


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, start: int, length: int) -> None:
    """Queue ``[start, start+length)`` for writing now; keep its pages (a reader follows)."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, start, length, SYNC_FILE_RANGE_WRITE)  # an error (EIO...) shows at the fsync


def drop(fd: int, start: int = 0, length: int = 0) -> None:
    """Queue the range's dirty pages for writing and drop its clean ones (length 0: to the end)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)


class Behind:
    """Drops the ranges written to one file once DROP_LAG bytes more have been written after them
    (written back by then, so their pages go), each queued for writeback as it is written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._ranges: deque[tuple[int, int]] = deque()
        self._bytes = 0

    def written(self, start: int, length: int) -> None:
        start_writeback(self.fd, start, length)
        self._ranges.append((start, length))
        self._bytes += length
        while self._bytes > DROP_LAG:
            old, n = self._ranges.popleft()
            self._bytes -= n
            drop(self.fd, old, n)
