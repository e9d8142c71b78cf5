"""verify's own reading of base rows in float64: as stored, or dequantized from each quantized
layout by code of its own (written from the formats, not shared with the merge's codecs, so that
a wrong reading in one of them shows as a disagreement).

Layouts (``Quant.layout``): ``fp8`` (e4m3 times a scale per (bn, bk) block), ``bnb4`` (flat
nibbles, high first, through quant_map times the flat block's absmax), and the integer groups
``rows`` / ``gptq`` / ``awq``: ``W[n, k] = (q - z[n, g(k)]) * s[n, g(k)]``, each with its own
place for the code of W[n, k] and the zero point of (n, g).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .codecs.plain import TORCH_DTYPES
from .formats.checkpoint import pread_into
from .formats.header import DTYPE_SIZES
from .plan.types import Source, TensorPlan

AWQ_POSITION = {element: j for j, element in enumerate((0, 2, 4, 6, 1, 3, 5, 7))}  # column n % 8 -> nibble


class Reader:
    """pread of tensor rows and blocks, with one open descriptor per file."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read(self, src: Source, offset: int, nbytes: int) -> bytearray:
        fd = self._fds.get(src.path)
        if fd is None:
            fd = self._fds[src.path] = os.open(src.path, os.O_RDONLY)
        buf = bytearray(nbytes)
        pread_into(fd, src.data_start + src.info.begin + offset, memoryview(buf), path=src.path)
        return buf

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


def as_tensor(buf: bytearray, dtype: str) -> torch.Tensor:
    return torch.frombuffer(buf, dtype=TORCH_DTYPES[dtype]) if buf else torch.empty(0, dtype=TORCH_DTYPES[dtype])


def base_rows(t: TensorPlan, src: Source, io: Reader, row0: int, k: int, cols: int) -> torch.Tensor:
    """Rows ``[row0, row0 + k)`` of the base tensor in float64: as stored, or dequantized by this
    module's reading of its layout (``DEQUANTIZE``)."""
    if t.quant is None or t.source is not None:
        item = DTYPE_SIZES[src.info.dtype]
        return as_tensor(io.read(src, row0 * cols * item, k * cols * item), src.info.dtype).double().view(k, cols)
    if t.quant.layout not in DEQUANTIZE:
        raise NotImplementedError(f"verify does not read the {t.quant.scheme!r} layout {t.quant.layout!r}")
    return DEQUANTIZE[t.quant.layout](t, src, io, row0, k, cols)


def _side(t: TensorPlan, io: Reader, key: str) -> torch.Tensor:
    """A side tensor whole, as int64 (integer tensors) or float64."""
    s = t.quant.side[key] if t.quant else None
    assert s is not None
    buf = io.read(s, 0, s.info.nbytes)
    ints = {"U8": torch.uint8, "I32": torch.int32, "I64": torch.int64}.get(s.info.dtype)
    flat = torch.frombuffer(buf, dtype=ints).long() if ints else as_tensor(buf, s.info.dtype).double()
    return flat.view(s.info.shape)


def _scaled_fp8_rows(t: TensorPlan, src: Source, io: Reader, row0: int, k: int, cols: int) -> torch.Tensor:
    """An e4m3 weight with a scale per (bn, bk) block: ``q * s[i // bn, j // bk]``."""
    assert t.quant is not None
    bn, bk = t.quant.params
    q = torch.frombuffer(io.read(src, row0 * cols, k * cols), dtype=torch.uint8).view(torch.float8_e4m3fn)
    grid = _side(t, io, "scale").view(-(-(t.info.shape[0]) // bn), -(-cols // bk))  # whatever its stored shape
    return q.double().view(k, cols) * grid[torch.arange(row0, row0 + k) // bn][:, torch.arange(cols) // bk]


def _bnb4_block_rows(t: TensorPlan, src: Source, io: Reader, row0: int, k: int, cols: int) -> torch.Tensor:
    """Flat elements of a bitsandbytes 4-bit weight: the nibbles (high first) through quant_map,
    times their flat block's absmax (undone from its double quantization when nested)."""
    assert t.quant is not None
    _, blocksize, nested_blocksize, nested_offset = t.quant.params
    start, n = row0 * cols, k * cols
    packed = torch.frombuffer(io.read(src, start // 2, n // 2), dtype=torch.uint8)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()
    absmax = _side(t, io, "absmax").double()
    if "nested_absmax" in t.quant.side:
        nested = torch.arange(absmax.numel()) // nested_blocksize
        absmax = _side(t, io, "nested_quant_map")[absmax.long()] * _side(t, io, "nested_absmax")[nested] + nested_offset
    return (_side(t, io, "quant_map")[codes] * absmax[torch.arange(start, start + n) // blocksize]).view(k, cols)


def _int_codes(t: TensorPlan, src: Source, io: Reader, row0: int, k: int, cols: int) -> torch.Tensor:
    """The unsigned codes of W[row0:row0 + k] (int64 (k, K)), found where each layout keeps them."""
    assert t.quant is not None and t.quant.shape is not None
    bits, n = t.quant.params[0], t.quant.shape[0]
    rows = torch.arange(row0, row0 + k)
    if t.quant.layout == "rows":  # bytes along the row; 4-bit: element 2i low nibble of byte i
        raw = torch.frombuffer(io.read(src, row0 * cols * bits // 8, k * cols * bits // 8), dtype=torch.uint8).long()
        return raw.view(k, cols) if bits == 8 else torch.stack([raw & 15, raw >> 4], dim=-1).view(k, cols)
    if t.quant.layout == "gptq":  # word (p, n): W[n, 8p + j] in bits 4j
        words = torch.stack([torch.frombuffer(io.read(src, 4 * (p * n + row0), 4 * k), dtype=torch.int32).long()
                             for p in range(cols // 8)])  # (K/8, k)
        return torch.stack([(words >> (4 * j)) & 15 for j in range(8)], dim=1).reshape(cols, k).T
    first, last = row0 // 8, (row0 + k - 1) // 8  # awq: word (c, m): W[8m + e, c] in nibble AWQ_POSITION[e]
    words = torch.stack([torch.frombuffer(io.read(src, 4 * (c * n // 8 + first), 4 * (last - first + 1)),
                                          dtype=torch.int32).long() for c in range(cols)])  # (K, words)
    shifts = torch.tensor([4 * AWQ_POSITION[int(r) % 8] for r in rows])
    return ((words[:, rows // 8 - first] >> shifts) & 15).T


def _int_zeros(t: TensorPlan, io: Reader) -> torch.Tensor:
    """z[n, g] (float64 (N, G)): saved (packed as the layout packs them) or the symmetric 2^(bits-1)."""
    assert t.quant is not None and t.quant.shape is not None
    bits, n_out = t.quant.params[0], t.quant.shape[0]
    groups = t.quant.side["scale"].info.shape[1 if t.quant.layout == "rows" else 0]
    if "zero" not in t.quant.side:
        return torch.full((n_out, groups), float(1 << (bits - 1)), dtype=torch.float64)
    words, n = _side(t, io, "zero"), torch.arange(n_out)
    if t.quant.layout == "rows":  # (N*bits/32, G): output n in word n // (32/bits), bits (n % (32/bits)) * bits
        per = 32 // bits
        return ((words.view(-1, groups)[n // per] >> ((n % per) * bits)[:, None]) & ((1 << bits) - 1)).double()
    words = words.view(groups, -1)  # (G, N/8): gptq in order, awq interleaved; gptq's v1 saves z - 1
    shift = torch.tensor([4 * (AWQ_POSITION[int(i) % 8] if t.quant.layout == "awq" else int(i) % 8) for i in n])
    return (((words[:, n // 8] >> shift) & 15) + t.quant.params[2]).T.double()


def _int_rows(t: TensorPlan, src: Source, io: Reader, row0: int, k: int, cols: int) -> torch.Tensor:
    assert t.quant is not None
    size = t.quant.params[1] or cols
    scale = _side(t, io, "scale")
    scale = scale if t.quant.layout == "rows" else scale.T  # (N, G)
    group = _side(t, io, "g_idx") if "g_idx" in t.quant.side else torch.arange(cols) // size
    rows = slice(row0, row0 + k)
    zero = _int_zeros(t, io)[rows][:, group]
    return (_int_codes(t, src, io, row0, k, cols).double() - zero) * scale[rows][:, group]


# Quant.layout -> how verify reads its weights (its own code, not the merge's codecs)
DEQUANTIZE: dict[str, Callable[[TensorPlan, Source, Reader, int, int, int], torch.Tensor]] = {
    "fp8": _scaled_fp8_rows, "bnb4": _bnb4_block_rows, "rows": _int_rows, "gptq": _int_rows, "awq": _int_rows}
