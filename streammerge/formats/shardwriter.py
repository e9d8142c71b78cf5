"""The safetensors shard writer: header first, then data at fixed offsets, written from any thread
in any order; untouched tensors copied file to file in the kernel."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from ..errors import OutputError
from . import pagecache
from .checkpoint import pread_into
from .header import encode_header

COPY_BLOCK = 8 * 1024**2  # bounce buffer where the kernel cannot copy file to file
COPY_STEP = 64 * 1024**2  # untouched tensors are copied, and handed to writeback, in these pieces


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
