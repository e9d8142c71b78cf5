"""Page-cache hints: the writer's hint keeps pages a reader still needs; the reader's drops them."""

import ctypes
import hashlib
import os
import sys
import threading

import pytest

from streammerge.formats import pagecache
from streammerge.formats.shardwriter import ShardWriter
from streammerge.output.checksum import drop_cached, sha256_while_written

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache hints are Linux calls")


def resident_fraction(path) -> float:
    """Share of the file's pages in the page cache (mincore over a shared read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = os.path.getsize(path), os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value)
        pages = (size + page - 1) // page
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(addr, size, vec) == 0
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) / pages


def clean_file(path, nbytes: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))
        f.flush()
        os.fsync(f.fileno())  # every page clean and still cached


@linux
def test_writeback_hint_keeps_clean_pages_and_drop_drops_them(tmp_path):
    assert pagecache._SYNC_FILE_RANGE is not None  # otherwise the hint is silently a no-op
    path = tmp_path / "f.bin"
    clean_file(path, 16 << 20)
    assert resident_fraction(path) > 0.99
    fd = os.open(path, os.O_RDONLY)
    try:
        pagecache.start_writeback(fd, 0, 16 << 20)
        assert resident_fraction(path) > 0.99  # a reader following the writer still finds them in memory
        pagecache.drop(fd, 0, 8 << 20)
        assert resident_fraction(path) < 0.51  # the first half gone, the rest kept
        pagecache.drop(fd)
        assert resident_fraction(path) < 0.01
    finally:
        os.close(fd)


@linux
def test_checksum_behind_a_followed_writer(tmp_path):
    """The hash read right behind the writes (dropping what it has read) is the file's hash, and once
    the finished shard is let go nothing of it stays cached."""
    n = 48 << 20
    writer = ShardWriter(tmp_path / "s.safetensors", [("t", "U8", (n,))], {}, followed=True)
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(sha256_while_written(writer, cancelled=lambda: False)))
    reader.start()
    data = os.urandom(n)
    for at in range(0, n, 4 << 20):
        writer.write("t", at, memoryview(data)[at : at + (4 << 20)])
    writer.commit()
    reader.join()
    drop_cached(writer.path)
    assert resident_fraction(writer.path) < 0.01
    assert result == [hashlib.sha256(writer.path.read_bytes()).hexdigest()]


@linux
def test_writer_without_a_reader_drops_ranges_behind_it(tmp_path, monkeypatch):
    """With no checksum following, the writer drops each range once DROP_LAG more bytes are written."""
    monkeypatch.setattr(pagecache, "DROP_LAG", 8 << 20)
    path = tmp_path / "f.bin"
    clean_file(path, 32 << 20)  # clean pages: a drop takes them at once, whatever the disk's pace
    fd = os.open(path, os.O_RDWR)
    try:
        behind = pagecache.Behind(fd)
        for at in range(0, 32 << 20, 2 << 20):
            behind.written(at, 2 << 20)
        assert 0.24 <= resident_fraction(path) <= 0.26  # the last 8 of 32 MiB kept, the rest dropped
    finally:
        os.close(fd)
