"""GLoRA: ``W += s * (W * A + B)`` and ``bias += s * (bias * D + E + W0 @ C)`` (PEFT's merge), each of
A..E one of GLoRA's paths, by what is saved under ``glora_<X>.``: a low-rank product ``Xd @ Xu``, a
vector ``X`` (a column: one number per row), a scalar ``X`` (1,), or ``zeros`` (no term).

The weight is row-local. The bias term ``W0 @ C`` needs the layer's base weight: the bias's delta
reads it from the base (``Delta.companion``) in blocks of rows, before the merge of the bias.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .roles import ByRole

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta, Source
    from . import Factors

PATHS = ("A", "B", "C", "D", "E")
READ_ROWS_ELEMENTS = 1 << 16  # elements of the companion weight read at a time


def path_kind(d: Delta, name: str) -> str:
    """"lora", "vector", "scalar" or "none", from the saved tensors of path ``name``."""
    if d.lora.has(f"{name}_d"):
        return "lora"
    if d.lora.has(f"{name}_x"):
        return "scalar" if d.adapter.tensors[d.lora.key(f"{name}_x")].numel == 1 else "vector"
    return "none"


def _path_keys(d: Delta, names: str) -> list[str]:
    return [d.lora.key(f"{n}_{p}") for n in names for p in ("d", "u", "x") if d.lora.has(f"{n}_{p}")]


class GloraRows:
    def __init__(self, a: list[torch.Tensor], b: list[torch.Tensor], scale: float) -> None:
        self.a, self.b, self.scale = a, b, scale  # each path: [] (none), [x] (vector / scalar), [Xd, Xu]

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        a, b, s = self.a, self.b, self.scale
        if len(a) == 2:
            work.addcmul_(work, a[0][row0 : row0 + rows] @ a[1], value=s)
        elif a:
            work.mul_(1 + s * (a[0] if a[0].numel() == 1 else a[0][row0 : row0 + rows]))
        if len(b) == 2:
            work.addmm_(b[0][row0 : row0 + rows], b[1], alpha=s)
        elif b:
            work.add_(b[0] if b[0].numel() == 1 else b[0][row0 : row0 + rows], alpha=s)


@dataclass(frozen=True)
class Glora(ByRole):
    block_buffers = 1  # (W * (Xd @ Xu): the product's block)

    def factor_keys(self, d: Delta) -> list[str]:
        return _path_keys(d, "AB")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        out, cols = info.shape if len(info.shape) == 2 else (0, 0)
        for name in "AB":
            kind, keys = path_kind(d, name), _path_keys(d, name)
            shapes = [d.adapter.tensors[k].shape for k in keys]
            fits = {"lora": lambda: shapes[0][0] == out and shapes[1][1] == cols,
                    "vector": lambda: shapes[0] in ((out, 1), (out,)), "scalar": lambda: True,
                    "none": lambda: True}[kind]()
            if not out or not fits:
                return f"{d.lora.module}: GLoRA path {name} ({kind}, {shapes}) does not fit {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> GloraRows:
        def path(name: str) -> list[torch.Tensor]:
            return [factors.get(d.adapter, k).reshape(-1, 1) if path_kind(d, name) == "vector" else
                    factors.get(d.adapter, k) for k in _path_keys(d, name)]

        return GloraRows(path("A"), path("B"), d.scale)


class GloraBias:
    """``bias += s * (bias * D + E + W0 @ C)``, the bias viewed as one row."""

    def __init__(self, d: torch.Tensor | None, e: torch.Tensor | None, w0c: torch.Tensor | None, scale: float) -> None:
        self.d, self.e, self.w0c, self.scale = d, e, w0c, scale

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        if self.d is not None:
            work.mul_(1 + self.scale * self.d.view(1, -1))
        for term in (self.e, self.w0c):
            if term is not None:
                work.add_(term.view(1, -1), alpha=self.scale)


def weight_times(source: Source, c: torch.Tensor) -> torch.Tensor:
    """W0 @ c (float32, (out,)), W0 read from the base in blocks of rows (plain float dtypes)."""
    import torch

    from ..codecs import codec_for
    from ..formats.checkpoint import pread_into

    out, cols = source.info.shape
    codec = codec_for(source.info.dtype)
    step = max(1, READ_ROWS_ELEMENTS // cols)
    result = torch.empty(out, dtype=torch.float32, device=c.device)
    raw = torch.empty(step * cols * codec.itemsize, dtype=torch.uint8)
    work = torch.empty(step * cols, dtype=torch.float32, device=c.device)
    fd = os.open(source.path, os.O_RDONLY)
    try:
        for r0 in range(0, out, step):
            k = min(step, out - r0)
            n = k * cols * codec.itemsize
            pread_into(fd, source.data_start + source.info.begin + r0 * cols * codec.itemsize,
                       memoryview(raw.numpy())[:n], path=source.path)
            block = work[: k * cols].view(k, cols)
            codec.decode(codec.rows(raw[:n].to(c.device), k, cols), block, r0)
            result[r0 : r0 + k] = block @ c
    finally:
        os.close(fd)
    return result


@dataclass(frozen=True)
class GloraBiasMethod(ByRole):
    def factor_keys(self, d: Delta) -> list[str]:
        return _path_keys(d, "CDE")

    def held_floats(self, d: Delta) -> int:
        return 2 * READ_ROWS_ELEMENTS + (d.shape[0] if d.shape else 0)  # (a block of the weight, raw and float32)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        from ..formats.header import FLOAT_DTYPES

        out = info.shape[0] if len(info.shape) == 1 else 0
        if path_kind(d, "C") == "none":
            return None if out else f"{tensor} is not a bias"
        w = d.companion
        if w is None or list(w.info.shape[:1]) != [out] or w.info.dtype not in FLOAT_DTYPES or not w.path.is_file():
            return (f"{d.lora.module}: GLoRA's bias term W0 @ C reads the layer's weight, which must be a local "
                    f"{'/'.join(FLOAT_DTYPES)} tensor of {out} rows (download a Hub base first; quantized weights "
                    "are not read for it)")
        return None

    def load(self, d: Delta, factors: Factors) -> GloraBias:
        def vector(name: str) -> torch.Tensor | None:
            keys = _path_keys(d, name)
            if not keys:
                return None
            tensors = [factors.get(d.adapter, k) for k in keys]
            return (tensors[0] @ tensors[1]).reshape(-1) if len(tensors) == 2 else tensors[0].reshape(-1)

        c = vector("C")
        w0c = None if c is None or d.companion is None else weight_times(d.companion, c)
        return GloraBias(vector("D"), vector("E"), w0c, d.scale)


GLORA, GLORA_BIAS = Glora(), GloraBiasMethod()
