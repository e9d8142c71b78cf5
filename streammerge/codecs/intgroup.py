"""Integer weights in groups of input columns (GPTQ, AWQ, compressed-tensors ``pack-quantized``),
dequantized to float32:

    W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]

with unsigned codes ``q`` of ``bits`` bits, ``g(k) = k // group_size`` or a saved ``g_idx[k]``
(act-order), per-group scales ``s`` and zero points ``z`` (saved, or one constant for symmetric
schemes). The schemes differ only in where the codes lie, which a layout answers:
- ``rows``: int32 words along each row of W (compressed-tensors: (N, K*bits/32), element j of a
  word in bits ``bits*j``);
- ``gptq``: int32 words down the columns of W transposed (``qweight`` (K*bits/32, N): word (p, n)
  holds W[n, 8p + j] in bits ``4j``);
- ``awq``: int32 words along the rows of W transposed (``qweight`` (K, N/8): word (k, m) holds
  W[8m + AWQ_ORDER[j], k] in bits ``4j``).
A row chunk of the transposed layouts is a column range of ``qweight``: one byte range per
stored row (``spans``). Decoding works in slices of SLICE elements so that its temporaries stay
small on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import RowMajor

if TYPE_CHECKING:
    import torch

SLICE = 1 << 17
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word nibble j holds element AWQ_ORDER[j] of its 8 columns
SEQUENTIAL = tuple(range(8))


def unpack(words: torch.Tensor, bits: int, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """int32 words (R, W) -> their codes (R, W * 32/bits), element ``order[j]`` of a word from bits
    ``bits * j`` (zero points and small tensors; chunks of weights go through ``Layout.codes``)."""
    import torch

    per = 32 // bits
    out = torch.empty(words.shape[0], words.shape[1], per, dtype=torch.int32, device=words.device)
    for j in range(per):
        out[:, :, order[j]] = (words >> (bits * j)) & ((1 << bits) - 1)
    return out.view(words.shape[0], -1)


@dataclass(frozen=True)
class Groups:
    """Per-row scales and zero points of the groups (float32 (N, G)) and each column's group."""

    scale: torch.Tensor
    zero: torch.Tensor | float  # one constant for a symmetric scheme
    group_size: int
    g_idx: torch.Tensor | None = None  # (K,) long: act-order's group of each column

    def apply(self, work: torch.Tensor, row0: int) -> None:
        """``work`` (k, K) holds the codes of rows ``[row0, row0 + k)``: made ``(q - z) * s`` in place."""
        k, cols = work.shape
        s = self.scale[row0 : row0 + k]
        z = self.zero[row0 : row0 + k] if not isinstance(self.zero, float) else self.zero
        if self.g_idx is None and cols % self.group_size == 0:  # whole groups: broadcast, no temporaries
            view = work.view(k, cols // self.group_size, self.group_size)
            view.sub_(z[:, :, None] if not isinstance(z, float) else z).mul_(s[:, :, None])
            return
        import torch

        group = self.g_idx if self.g_idx is not None else torch.arange(cols, device=work.device) // self.group_size
        step = max(1, SLICE // cols)
        for r in range(0, k, step):
            part = work[r : r + step]
            part.sub_(z[r : r + step][:, group] if not isinstance(z, float) else z)
            part.mul_(s[r : r + step][:, group])


class IntCodec(RowMajor):
    """Codes of ``bits`` bits (4 or 8) dequantized by ``groups``; the layouts below say where the
    codes of a row chunk are stored and how to unpack them (``_codes``)."""

    dtype = "I32"
    itemsize = 1
    row_alignment = 1

    def __init__(self, bits: int, groups: Groups) -> None:
        self.bits, self.groups, self.per = bits, groups, 32 // bits

    def nbytes(self, elements: int) -> int:
        return elements * self.bits // 8

    def decode(self, stored: torch.Tensor, work: torch.Tensor, row0: int) -> None:
        rows, cols = work.shape
        step = max(self.row_alignment, SLICE // cols // self.row_alignment * self.row_alignment)
        for r in range(0, rows, step):
            k = min(step, rows - r)
            self._codes(self.block(stored, r, k), work[r : r + k])
        self.groups.apply(work, row0)

    def _codes(self, stored: torch.Tensor, work: torch.Tensor) -> None:
        """The unsigned codes of ``stored`` (a block of ``rows``) into float32 ``work`` (k, K)."""
        raise NotImplementedError

    def _words(self, stored: torch.Tensor, j: int) -> torch.Tensor:
        """Element ``j`` of every word, transposed: (words of a stored row, stored rows)."""
        return ((stored >> (self.bits * j)) & ((1 << self.bits) - 1)).T

    def encode(self, work: torch.Tensor, out: torch.Tensor) -> None:
        from ..errors import UnsupportedError

        raise UnsupportedError("writing integer-quantized weights is not supported; the output is 16-bit")


class RowsCodec(IntCodec):
    """compressed-tensors: int32 words along W's rows (N, K*bits/32), read as bytes (4-bit: two
    codes a byte, low nibble first)."""

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return raw.view(rows, cols * self.bits // 8)

    def _codes(self, stored: torch.Tensor, work: torch.Tensor) -> None:
        if self.bits == 8:
            work.copy_(stored)
            return
        k, cols = work.shape
        pairs = work.view(k, cols // 2, 2)
        pairs[:, :, 0].copy_(stored & 15)
        pairs[:, :, 1].copy_(stored >> 4)


class GptqCodec(IntCodec):
    """GPTQ ``qweight`` (K*bits/32, N): word (p, n) holds W[n, per*p + j] in bits ``bits*j``; a
    row chunk is columns ``[row0, +rows)`` of every word row."""

    def spans(self, row0: int, rows: int, cols: int) -> list[tuple[int, int]]:
        n = self.groups.scale.shape[0]
        return [(4 * (p * n + row0), 4 * rows) for p in range(cols // self.per)]

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        import torch

        return raw.view(torch.int32).view(cols // self.per, rows)

    def block(self, stored: torch.Tensor, b0: int, k: int) -> torch.Tensor:
        return stored[:, b0 : b0 + k]

    def _codes(self, stored: torch.Tensor, work: torch.Tensor) -> None:
        k, cols = work.shape
        for j in range(self.per):
            work.view(k, cols // self.per, self.per)[:, :, j].copy_(self._words(stored, j))


class AwqCodec(IntCodec):
    """AWQ gemm ``qweight`` (K, N/8): word (c, m) holds W[8m + AWQ_ORDER[j], c] in bits ``4j``; a
    row chunk (of whole words: 8 rows) is words ``[row0/8, +rows/8)`` of every stored row."""

    row_alignment = 8

    def spans(self, row0: int, rows: int, cols: int) -> list[tuple[int, int]]:
        n = self.groups.scale.shape[0]
        return [(4 * (c * n // 8 + row0 // 8), rows // 2) for c in range(cols)]

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        import torch

        return raw.view(torch.int32).view(cols, rows // 8)

    def block(self, stored: torch.Tensor, b0: int, k: int) -> torch.Tensor:
        return stored[:, b0 // 8 : (b0 + k) // 8]

    def _codes(self, stored: torch.Tensor, work: torch.Tensor) -> None:
        k, cols = work.shape
        for j in range(8):
            work.view(k // 8, 8, cols)[:, AWQ_ORDER[j], :].copy_(self._words(stored, j))
