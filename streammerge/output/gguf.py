"""The GGUF sink: one ``.gguf`` file written in the same pass as the merge (``Sink`` protocol).

The header (metadata and tensor infos, ``formats/gguf_layout.py`` and ``gguf_meta.py``) is written
first, from the plan; then each tensor's data as its rows arrive. The rows arrive exactly as the
safetensors sink would write them (merged and rounded once to the checkpoint's dtype, or copied),
and are converted here as llama.cpp's converter converts that checkpoint: widened to float32
unless F16 / F32, rows permuted (llama's q / k), then encoded by gguf's own quantizer, which works
row by row (a row chunk's bytes are the whole tensor's for those rows). Conversion goes in pieces of
at most ``PIECE_ELEMENTS`` so that its temporaries stay small beside the working set.

Staged as ``NAME.gguf.partial`` beside the output, renamed when complete; a failure removes it.
There is no resume: a rerun starts the file again (said in the README).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputError
from ..formats.header import DTYPE_SIZES

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..formats.gguf_layout import GgufLayout, GgufTensor
    from ..plan.types import MergePlan

PIECE_ELEMENTS = 1 << 18
COPY_BYTES = 1 << 20  # read at a time when an untouched tensor is converted


class GgufSink:
    def __init__(self, plan: MergePlan, out: Path, *, layout: GgufLayout, config: dict[str, Any],
                 tokenizer_dir: Path, pre: str | None = None, name: str = "model") -> None:
        self.plan, self.out, self.layout, self.pre, self.name = plan, out, layout, pre, name
        self.config, self.tokenizer_dir = config, tokenizer_dir
        self.partial = out.with_name(out.name + ".partial")
        self.kept: dict[str, dict[str, Any]] = {}
        self.files_copied: list[str] = []
        self.notes: list[str] = []
        self.tokenizer_note: str | None = None
        self.pushed_to: str | None = None
        self.fetch_dir = out.with_name(f".{out.name}.streammerge-fetch")  # (--low-disk: removed at the end)
        self._fd = -1
        self._carry: dict[str, bytes] = {}  # per tensor: bytes of a row not yet complete
        self._dtypes = {t.name: t.out_dtype for t in plan.tensors()}  # the bytes' dtype, as the plan writes them
        self._header, self._data_start, data_bytes = _header(self)  # (refusals of the tokenizer come now)
        self.size = self._data_start + data_bytes  # the file's bytes

    # Sink protocol
    def prepare(self, fingerprint: Callable[[str], str]) -> dict[str, dict[str, Any]]:
        try:
            fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot create {self.partial.name} ({exc.strerror})") from None
        _lock(fd, self.out)
        self._fd = fd  # (ours from here: fail() removes it)
        os.ftruncate(self._fd, 0)  # (no resume: a GGUF is written again from its start)
        os.write(self._fd, self._header)
        os.ftruncate(self._fd, self.size)  # (zero padding between tensors, and at the end)
        return {}

    def bytes_to_write(self) -> int:
        return self.size

    def held_bytes(self) -> int:
        """The header, and a piece's conversion: float32 rows, gguf's quantizer temporaries and the
        bytes written (32 bytes an element, measured under 24), and a copied tensor's read and carry."""
        return len(self._header) + 32 * PIECE_ELEMENTS + 3 * COPY_BYTES

    def extra_bytes(self) -> int:
        return 0  # (no files beside it)

    def open_shard(self, shard: str) -> GgufSink:
        return self

    def commit_shard(self, shard: str) -> None:
        pass  # (one file: fsynced once, at the end)

    def closed_shard(self, shard: str) -> None:
        pass

    def drain(self) -> None:
        pass

    def finish(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        if self._carry:
            raise OutputError(f"GGUF: tensors {sorted(self._carry)} ended inside a row")
        os.replace(self.partial, self.out)
        shutil.rmtree(self.fetch_dir, ignore_errors=True)

    def fail(self, exc: BaseException) -> None:
        if self._fd < 0:
            return  # (never ours: another run's file, or nothing staged yet)
        self.close()
        self.partial.unlink(missing_ok=True)
        shutil.rmtree(self.fetch_dir, ignore_errors=True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ShardOut: bytes of one tensor, in the checkpoint's output dtype, in order
    def write(self, name: str, offset_in_tensor: int, data: memoryview) -> None:
        if name not in self.layout.tensors:
            return  # (a tensor the converter leaves out)
        t, dtype = self.layout.tensors[name], self._dtypes[name]
        item = DTYPE_SIZES[dtype]
        row_bytes = (t.shape[-1] if len(t.shape) > 1 else t.shape[0]) * item
        carry = self._carry.pop(name, b"")
        if not carry and len(data) % row_bytes == 0 and offset_in_tensor % row_bytes == 0:  # whole rows (merged chunks)
            self._convert(t, dtype, data, offset_in_tensor // row_bytes)
            return
        pending = carry + bytes(data)  # (a converted tensor's chunks may end inside a row)
        start = offset_in_tensor - len(carry)
        whole = len(pending) // row_bytes * row_bytes
        if whole < len(pending):
            self._carry[name] = pending[whole:]
        if whole:
            self._convert(t, dtype, memoryview(pending)[:whole], start // row_bytes)

    def copy_range(self, src_fd: int, src_offset: int, name: str, nbytes: int) -> None:
        if name not in self.layout.tensors:
            return
        done = 0
        while done < nbytes:
            n = min(COPY_BYTES, nbytes - done)
            self.write(name, done, memoryview(os.pread(src_fd, n, src_offset + done)))
            done += n

    # conversion
    def _convert(self, t: GgufTensor, dtype: str, data: memoryview, row0: int) -> None:
        import gguf
        import numpy as np

        cols = t.shape[-1] if len(t.shape) > 1 else t.shape[0]
        rows = len(data) // (cols * DTYPE_SIZES[dtype])
        out_row = t.nbytes // (t.shape[0] if len(t.shape) > 1 else 1)
        step = max(1, PIECE_ELEMENTS // cols)
        for r0 in range(0, rows, step):
            k = min(step, rows - r0)
            x = _as_numpy(data, dtype, r0 * cols, k * cols).reshape(k, cols)
            if t.plus_one:  # (in the dtype the converter holds it in: float32, or F16 as stored)
                x = x + x.dtype.type(1)
            q = np.ascontiguousarray(gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, t.qtype)))
            raw = q.view(np.uint8).reshape(k, -1)
            first = row0 + r0
            if not t.heads:
                os.pwrite(self._fd, raw.tobytes(), self._data_start + t.offset + first * out_row)
                continue
            for i in range(k):  # llama's rotary layout: each row to its place in its head
                os.pwrite(self._fd, raw[i].tobytes(), self._data_start + t.offset + _permuted(first + i, t) * out_row)


def _lock(fd: int, out: Path) -> None:
    """The staged file locked for this run (released when closed): a second run at once is refused."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # (no flock on this platform: no protection)
        return
    except OSError:
        os.close(fd)
        raise OutputError(f"{out}: another streammerge run is writing this file right now; wait for it to finish or "
                          "choose another --output") from None


def _header(sink: GgufSink) -> tuple[bytes, int, int]:
    """The file's header (metadata, tensor infos) as bytes, where the data starts, and the data's
    size; each part's offset in the data set. Written to a temporary file by gguf's own writer."""
    import tempfile

    import gguf

    from ..formats.gguf_meta import write_metadata

    layout = sink.layout
    with tempfile.TemporaryDirectory(prefix="streammerge-gguf-") as scratch:
        writer = gguf.GGUFWriter(Path(scratch) / "header.gguf", layout.arch_name)
        write_metadata(writer, sink.config, layout.file_type, sink.tokenizer_dir, sink.name, arch=layout.arch,
                       pre=sink.pre)
        offset = 0
        for gguf_name, parts in layout.files().items():
            first, nbytes = parts[0], sum(p.nbytes for p in parts)
            for p in parts:  # (stacked experts: consecutive slices)
                p.offset = offset + p.index * p.nbytes
            writer.add_tensor_info(gguf_name, first.gguf_shape, _np_dtype(first.qtype), nbytes,
                                   raw_dtype=getattr(gguf.GGMLQuantizationType, first.qtype))
            offset += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
        writer.open_output_file()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        header = (Path(scratch) / "header.gguf").read_bytes()
    return header, gguf.GGUFWriter.ggml_pad(len(header), writer.data_alignment), offset


def _permuted(row: int, t: GgufTensor) -> int:
    """Where row ``row`` of a q / k weight goes (within its head: a * half + b -> b * 2 + a)."""
    head_dim = t.shape[0] // t.heads
    half = head_dim // 2
    head, inner = divmod(row, head_dim)
    a, b = divmod(inner, half)
    return head * head_dim + b * 2 + a


def _as_numpy(data: memoryview, dtype: str, start: int, count: int) -> Any:
    """Elements [start, start + count) as the converter reads them: F16 / F32 as stored, else float32."""
    import numpy as np

    item = DTYPE_SIZES[dtype]
    raw = np.frombuffer(data, dtype=np.uint8, count=count * item, offset=start * item)
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16)
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F64":
        return raw.view(np.float64).astype(np.float32)
    raise OutputError(f"GGUF: a {dtype} tensor is not converted by this version")


def _np_dtype(qtype: str) -> Any:
    import numpy as np

    return np.float16 if qtype == "F16" else np.float32  # (the shape stays in elements: raw_dtype gives the type)
