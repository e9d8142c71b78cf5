"""FP8 written back (``--dtype fp8`` on an FP8 base): a merged weight re-quantized in the base's own
scheme, its scale tensor rewritten with it (same name, grid and dtype).

One pinned formula, per scale block (bn, bk) of the base's scheme (tensor: the whole weight;
channel: a row; block; group: part of a row):

    x = dequant(base) + delta            (float32, as merged)
    s = amax(|x|) / 448                  rounded to the scale's dtype; s = 1 where amax is 0
    q = e4m3(clamp(x / s, -448, 448))    round to nearest even

Rows are encoded in order, in blocks of whole block rows (the chunks align to bn); a per-tensor
scale needs every row first (a first pass takes amax). How much of the delta survives is measured
as it is written: ``survives = <dequant(out) - W0, x - W0> / ||x - W0||^2``, the share of the
delta's direction kept (1: all of it; 0: none, the codes did not move), where W0 = dequant(base).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import RowMajor

if TYPE_CHECKING:
    import torch

E4M3_MAX = 448.0
SLICE = 1 << 17  # elements of the temporaries an encode step makes


def torch_div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x / s


def torch_mul(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x * s


class Snapshot:
    """The first 'delta' of a re-quantized weight: keeps W0 (the dequantized base rows) of each block."""

    def __init__(self, like: torch.Tensor) -> None:
        import torch

        self.rows = torch.empty_like(like)  # as large as the processor's float32 block

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        self.rows[: work.numel()].view_as(work).copy_(work)

    def of(self, work: torch.Tensor) -> torch.Tensor:
        return self.rows[: work.numel()].view_as(work)


class WholeTensor(Snapshot):
    """A per-tensor scale: amax over every row of x, taken in a first pass (``deltas.FirstPass``)."""

    amax: torch.Tensor

    def begin(self, cols: int, device: torch.device) -> None:
        import torch

        self.amax = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, work: torch.Tensor, row0: int) -> None:
        self.amax = absmax(self.amax, work)

    def end(self) -> None:
        pass


def absmax(amax: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """max(amax, |work|) without a temporary of work's size."""
    return amax.maximum(work.amax().abs()).maximum(work.amin().abs())


class Fp8Encoder(RowMajor):
    """Encodes rows of x into e4m3 codes with new block scales; ``scale_bytes`` at the end."""

    dtype = "F8_E4M3"
    itemsize = 1

    def __init__(self, shape: tuple[int, int], block: tuple[int, int], scale_dtype: torch.dtype,
                 snapshot: Snapshot) -> None:
        import torch

        n, k = shape
        self.bn, self.bk = block
        self.whole = isinstance(snapshot, WholeTensor)
        self.row_alignment = 1 if self.whole or self.bn == 1 else self.bn
        self.scale_dtype, self.snapshot = scale_dtype, snapshot
        device = snapshot.rows.device
        self.grid = torch.ones(math.ceil(n / self.bn), math.ceil(k / self.bk), dtype=torch.float32, device=device)
        self.row = 0  # the next row to encode (rows come in order)
        self.dot = 0.0  # <dequant(out) - W0, x - W0>, summed over slices
        self.delta_sq = 0.0  # ||x - W0||^2

    def nbytes(self, elements: int) -> int:
        return elements

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        import torch

        return raw.view(torch.float8_e4m3fn).view(rows, cols)

    def decode(self, stored: torch.Tensor, work: torch.Tensor, row0: int) -> None:
        work.copy_(stored)

    def encode(self, work: torch.Tensor, out: torch.Tensor) -> None:
        """Rows ``[self.row, + len(work))`` of x (float32; left as they are) into ``out`` (e4m3): the
        block scales first (reductions only), then the codes and the survival sums in slices of
        rows, so that temporaries stay at SLICE elements whatever the block."""
        k, cols = work.shape
        scales = self._row_scales(work)  # (k, blocks in a row): each row's scale per column block
        base = self.snapshot.of(work)
        step = max(1, SLICE // cols)
        for r in range(0, k, step):
            x, w0, q, s = work[r : r + step], base[r : r + step], out[r : r + step], scales[r : r + step]
            q.copy_(self._per_block(x, s, torch_div).clamp_(-E4M3_MAX, E4M3_MAX))  # -> e4m3: round to nearest even
            delta = x - w0
            self.delta_sq += float(delta.square().sum())
            moved = self._per_block(q.float(), s, torch_mul).sub_(w0)  # dequant(out) - W0
            self.dot += float(moved.mul_(delta).sum())
        self.row += k

    def _per_block(self, x: torch.Tensor, s: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
        """``op(x, scale of each element)`` for rows ``x`` (m, K) with their scales ``s`` (m, blocks)."""
        import torch

        m, cols = x.shape
        full = cols // self.bk
        parts = [op(x[:, : full * self.bk].view(m, full, self.bk), s[:, :full, None]).view(m, full * self.bk)] if full else []
        if cols % self.bk:  # the partial edge block
            parts.append(op(x[:, full * self.bk :], s[:, full : full + 1]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _row_scales(self, work: torch.Tensor) -> torch.Tensor:
        """The new scales of the block rows these rows fill, set in the grid; per row, (k, blocks)."""
        import torch

        k, cols = work.shape
        first = self.row // self.bn
        if isinstance(self.snapshot, WholeTensor):
            amax = self.snapshot.amax.reshape(1, 1)
        else:
            full, per_row = cols // self.bk, []
            if full:
                blocks = work[:, : full * self.bk].view(k, full, self.bk)
                per_row.append(torch.maximum(blocks.amax(dim=2).abs(), blocks.amin(dim=2).abs()))
            if cols % self.bk:
                edge = work[:, full * self.bk :]
                per_row.append(torch.maximum(edge.amax(dim=1).abs(), edge.amin(dim=1).abs())[:, None])
            rows = torch.cat(per_row, dim=1)  # (k, blocks)
            groups = math.ceil(k / self.bn)
            if groups * self.bn > k:
                rows = torch.cat([rows, rows.new_zeros(groups * self.bn - k, rows.shape[1])])
            amax = rows.view(groups, self.bn, -1).amax(dim=1)
        s = (amax / E4M3_MAX).to(self.scale_dtype).float()
        s = torch.where(s == 0, torch.ones_like(s), s)
        self.grid[first : first + s.shape[0]] = s
        return s.expand(k, -1) if isinstance(self.snapshot, WholeTensor) else s.repeat_interleave(self.bn, dim=0)[:k]

    def scale_bytes(self) -> memoryview:
        """The new scale tensor's bytes, in its stored dtype (grid order: the stored shape's order)."""
        import torch

        return memoryview(self.grid.to(self.scale_dtype).cpu().contiguous().view(-1).view(torch.uint8).numpy())

    @property
    def survives(self) -> float | None:
        return self.dot / self.delta_sq if self.delta_sq > 0 else None


def encoder(shape: tuple[int, int], block: tuple[int, int], scale_dtype: str, like: torch.Tensor) -> Fp8Encoder:
    """The encoder of one merged weight (``like``: the processor's float32 block, for the snapshot)."""
    from .plain import SIDE_DTYPES

    whole = tuple(block) == tuple(shape)
    return Fp8Encoder(shape, block, SIDE_DTYPES[scale_dtype], WholeTensor(like) if whole else Snapshot(like))
