"""Plain floating dtypes (F16, BF16, F32, F64): stored values widened to float32 exactly, and
float32 rounded once (round to nearest even) to the stored dtype."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UnsupportedError
from ..formats.checkpoint import read_bytes, read_tensor_bytes
from ..formats.header import SafetensorsHeader
from . import RowMajor

if TYPE_CHECKING:
    from ..plan.types import Source

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


@dataclass(frozen=True)
class PlainCodec(RowMajor):
    """One element per stored value; any row is a valid chunk boundary; no side tensors."""

    dtype: str
    row_alignment: int = 1

    @property
    def itemsize(self) -> int:
        return TORCH_DTYPES[self.dtype].itemsize

    def nbytes(self, elements: int) -> int:
        return elements * self.itemsize

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Raw bytes (uint8) of ``rows`` whole rows, as a (rows, cols) tensor of the stored dtype."""
        return raw.view(TORCH_DTYPES[self.dtype]).view(rows, cols)

    def decode(self, stored: torch.Tensor, work: torch.Tensor, row0: int) -> None:
        """Rows of ``rows()`` into the float32 ``work`` of the same shape (exact)."""
        work.copy_(stored)

    def encode(self, work: torch.Tensor, out: torch.Tensor) -> None:
        """float32 ``work`` into ``out`` (the stored dtype, same shape), rounded once."""
        out.copy_(work)


SIDE_DTYPES = {**TORCH_DTYPES, "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}


def read_tensor(path: Path, header: SafetensorsHeader, name: str) -> torch.Tensor:
    """Read one tensor whole (used for adapter factors, which are small; integer ones: SHiRA's indices)."""
    info = header.tensors[name]
    if info.dtype not in SIDE_DTYPES:
        raise UnsupportedError(
            f"{path}: tensor {name!r} is {info.dtype}; the merge arithmetic reads only "
            f"{', '.join(SIDE_DTYPES)} (quantized bases: point --base at the 16-bit checkpoint)"
        )
    buf = read_tensor_bytes(header, name)
    if not buf:
        return torch.empty(info.shape, dtype=SIDE_DTYPES[info.dtype])
    return torch.frombuffer(buf, dtype=SIDE_DTYPES[info.dtype]).reshape(info.shape)


def read_side(src: Source) -> torch.Tensor:
    """A small tensor (a side tensor: scales, codes of zero points) read whole from wherever it is, as stored."""
    info = src.info
    dtype = SIDE_DTYPES.get(info.dtype)
    if dtype is None:
        raise UnsupportedError(f"{src.path}: side tensor {info.name!r} is {info.dtype}, not a float or integer tensor")
    buf = read_bytes(src.path, src.data_start + info.begin, info.nbytes)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape) if buf else torch.empty(info.shape, dtype=dtype)
