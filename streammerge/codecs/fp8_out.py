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
from typing import TYPE_CHECKING

from . import RowMajor

if TYPE_CHECKING:
    import torch

E4M3_MAX = 448.0


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

    def observe(self, work: torch.Tensor) -> None:
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
        self.dot = torch.zeros((), dtype=torch.float64, device=device)  # <dequant(out) - W0, x - W0>
        self.delta_sq = torch.zeros((), dtype=torch.float64, device=device)  # ||x - W0||^2

    def nbytes(self, elements: int) -> int:
        return elements

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        import torch

        return raw.view(torch.float8_e4m3fn).view(rows, cols)

    def decode(self, stored: torch.Tensor, work: torch.Tensor, row0: int) -> None:
        work.copy_(stored)

    def encode(self, work: torch.Tensor, out: torch.Tensor) -> None:
        """Rows ``[self.row, + len(work))`` of x (float32; left as they are) into ``out`` (e4m3)."""
        k, cols = work.shape
        first = self.row // self.bn
        groups = math.ceil(k / self.bn) if not self.whole else 1
        base = self.snapshot.of(work)
        for j0 in range(0, cols, self.bk):
            x, w0, q = work[:, j0 : j0 + self.bk], base[:, j0 : j0 + self.bk], out[:, j0 : j0 + self.bk]
            s = self._scales(x, first, groups, j0 // self.bk)
            per_row = s.repeat_interleave(self.bn)[:k, None] if not self.whole else s.reshape(1, 1)
            q.copy_((x / per_row).clamp_(-E4M3_MAX, E4M3_MAX))  # float32 -> e4m3: round to nearest even
            delta = x - w0
            self.delta_sq += delta.double().square().sum()
            self.dot += ((q.float() * per_row - w0).double() * delta).sum()
        self.row += k

    def _scales(self, x: torch.Tensor, first: int, groups: int, j: int) -> torch.Tensor:
        """The scales of block column ``j`` for the block rows these rows fill, set in the grid."""
        import torch

        if isinstance(self.snapshot, WholeTensor):
            amax = self.snapshot.amax
        else:
            k = x.shape[0]
            pad = groups * self.bn - k
            lo, hi = x.amin(dim=1), x.amax(dim=1)  # (k,): per row of this block column
            rows = torch.maximum(lo.abs(), hi.abs())
            if pad:
                rows = torch.cat([rows, rows.new_zeros(pad)])
            amax = rows.view(groups, self.bn).amax(dim=1)
        s = (amax / E4M3_MAX).to(self.scale_dtype).float()
        s = torch.where(s == 0, torch.ones_like(s), s)
        self.grid[first : first + groups, j] = s
        return s

    def scale_bytes(self) -> memoryview:
        """The new scale tensor's bytes, in its stored dtype (grid order: the stored shape's order)."""
        import torch

        return memoryview(self.grid.to(self.scale_dtype).cpu().contiguous().view(-1).view(torch.uint8).numpy())

    @property
    def survives(self) -> float | None:
        return float(self.dot / self.delta_sq) if float(self.delta_sq) > 0 else None


def encoder(shape: tuple[int, int], block: tuple[int, int], scale_dtype: str, like: torch.Tensor) -> Fp8Encoder:
    """The encoder of one merged weight (``like``: the processor's float32 block, for the snapshot)."""
    from .plain import SIDE_DTYPES

    whole = tuple(block) == tuple(shape)
    return Fp8Encoder(shape, block, SIDE_DTYPES[scale_dtype], WholeTensor(like) if whole else Snapshot(like))
