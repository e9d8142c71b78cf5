"""The safetensors header: a strict parser for untrusted files and an encoder for output shards.

File layout: 8-byte little-endian u64 ``N``, ``N`` bytes of UTF-8 JSON, then the data buffer.
Pure Python (no torch) so that it can be fuzzed quickly and used by ``plan`` without loading data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

MAX_HEADER_BYTES = 100_000_000  # the reference reader's cap

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "C64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what the merge arithmetic reads and writes


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in data order, and where the data buffer starts."""

    path: Path
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class HeaderError(InputError):
    """A safetensors header that is not well formed. Always names the file."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(name: str, entry: Any, where: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError(f"{where}: entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise HeaderError(
            f"{where}: tensor {name!r} has unknown dtype {dtype!r} "
            f"(known: {', '.join(DTYPE_SIZES)})"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(f"{where}: tensor {name!r} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise HeaderError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    if info.nbytes != info.numel * info.itemsize:
        raise HeaderError(
            f"{where}: tensor {name!r} spans {info.nbytes} bytes but {dtype}{list(shape)} "
            f"needs {info.numel * info.itemsize}"
        )
    return info


def _entries(doc: dict[str, Any], where: str) -> tuple[list[TensorInfo], dict[str, str], int]:
    """Validate a decoded header: tensors in data order, the metadata, and the data size."""
    doc = dict(doc)
    metadata = doc.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # optional; mlx writes null
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError(f"{where}: __metadata__ must map strings to strings")
    infos = sorted((_parse_entry(k, v, where) for k, v in doc.items()), key=lambda t: (t.begin, t.end))
    cursor = 0
    for info in infos:
        if info.begin != cursor:
            kind = "overlaps the previous tensor" if info.begin < cursor else "leaves a hole"
            raise HeaderError(f"{where}: tensor {info.name!r} at byte {info.begin} {kind}")
        cursor = info.end
    return infos, dict(metadata), cursor


def planned_header(doc: dict[str, Any], *, path: Path, where: str) -> SafetensorsHeader:
    """A header known before its file is here (read remotely): validated like a local one, with
    ``data_start`` unknown (-1) until the file is fetched and its own header read."""
    infos, metadata, _ = _entries(doc, where)
    return SafetensorsHeader(path, -1, {t.name: t for t in infos}, metadata)


def parse_header(prefix: bytes, raw: bytes, *, file_size: int, path: Path) -> SafetensorsHeader:
    """Validate a header given its 8-byte length prefix and JSON bytes.

    Rejects: lengths beyond the file or the cap, non-JSON or non-object headers, unknown dtypes,
    bad shapes or offsets, spans that disagree with the shape, holes, overlaps, trailing bytes.
    """
    where = str(path)
    if len(prefix) != 8:
        raise HeaderError(f"{where}: file is {file_size} bytes, too short to be safetensors")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if 8 + n > file_size or len(raw) != n:
        raise HeaderError(
            f"{where}: header length {n} runs past the end of the {file_size}-byte file "
            "(truncated or not a safetensors file)"
        )
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise HeaderError(f"{where}: header is a JSON {type(doc).__name__}, not an object")
    infos, metadata, data_size = _entries(doc, where)
    if 8 + n + data_size != file_size:
        raise HeaderError(
            f"{where}: header describes {data_size} data bytes but the file holds "
            f"{file_size - 8 - n} (truncated or padded file)"
        )
    return SafetensorsHeader(path, 8 + n, {t.name: t for t in infos}, dict(metadata))


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file without touching its data."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            raw = f.read(n) if n <= min(MAX_HEADER_BYTES, size) else b""
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a .safetensors file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_header(prefix, raw, file_size=size, path=path)


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Lay out tensors in the given order; return the header bytes (prefix included) and offsets.

    The JSON is padded with spaces to a multiple of 8 so the data buffer stays aligned.
    """
    doc: dict[str, Any] = {"__metadata__": dict(metadata)}
    offsets: dict[str, tuple[int, int]] = {}
    cursor = 0
    for name, dtype, shape in entries:
        end = cursor + math.prod(shape) * DTYPE_SIZES[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, end]}
        offsets[name] = (cursor, end)
        cursor = end
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
