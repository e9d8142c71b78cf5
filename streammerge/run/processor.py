"""The arithmetic on a chunk of rows: decode to float32, apply the deltas, encode, rounded once.

A ``Processor`` owns the reusable buffers for one device, allocated once from the budget:
- two host ``Slot``s: raw bytes read from the base, reused for the rounded output (pinned on
  CUDA); one is filled while the I/O thread writes the other;
- ``work``: float32 accumulator on the device;
- ``dev_io``: on CUDA only, the device copy of the raw / rounded bytes.
No per-chunk allocation happens on the hot path. What the bytes mean is the codecs' business
(``streammerge.codecs``), what changes them the deltas' (``streammerge.deltas``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import InputError

if TYPE_CHECKING:
    from ..codecs import Codec
    from ..deltas import Applied, FirstPass


class NonFiniteError(InputError):
    """The merge produced NaN or Inf: the inputs hold non-finite or overflowing values."""


BLOCK_ELEMENTS = 1 << 18  # 1 MiB of float32: stays in L2 between the passes (measured fastest here)


class Slot:
    """A host I/O buffer: the merge thread fills one while the I/O thread writes out another."""

    def __init__(self, nbytes: int, *, pinned: bool) -> None:
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.bytes = memoryview(self.tensor.numpy()).cast("B")
        self.free = threading.Event()
        self.free.set()


class Processor:
    """Merges row chunks on one device with buffers sized once from the memory budget."""

    def __init__(self, device: torch.device, *, capacity: int, io_itemsize: int, widest: int, slots: int = 2) -> None:
        self.device = device
        self.capacity = capacity  # elements per chunk
        self.io_itemsize = io_itemsize
        cuda = device.type == "cuda"
        self.slots = [Slot(capacity * io_itemsize, pinned=cuda) for _ in range(slots)]
        self._next = 0
        # CPU: one cache-sized block (or the widest row); CUDA: the whole chunk
        work = capacity if cuda else min(capacity, max(BLOCK_ELEMENTS, widest))
        self.work = torch.empty(work, dtype=torch.float32, device=device)
        self.dev_io = torch.empty(capacity * io_itemsize, dtype=torch.uint8, device=device) if cuda else None

    def acquire(self) -> Slot:
        """The next host buffer, once the I/O thread has finished writing its previous contents."""
        slot = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        slot.free.wait()
        slot.free.clear()
        return slot

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=False).contiguous()

    def raw_bytes(self, slot: Slot, elements: int, nbytes: int) -> memoryview:
        """Where the caller reads a chunk's ``nbytes`` raw bytes (``elements`` elements): the END of the
        slot's first ``elements * k`` bytes. Outputs are written from the start, block after block; an
        output block never reaches raw bytes not yet consumed, whichever of the two sizes is larger."""
        end = elements * self.io_itemsize
        return slot.bytes[end - nbytes : end]

    def merge_rows(self, slot: Slot, *, src: Codec, out: Codec, row0: int, rows: int, cols: int,
                   deltas: Sequence[Applied], tensor: str, align: int = 1) -> memoryview:
        """Rows ``[row0, row0+rows)`` whose raw bytes are already in ``raw_bytes(slot, ...)``: decoded,
        changed by ``deltas`` in order, checked finite, encoded once. Returns the output bytes (a view
        of ``slot``).

        On the CPU the chunk is worked in blocks of whole rows of about BLOCK_ELEMENTS, so that the
        float32 accumulator stays in cache between the passes (widen, add, round, check); on CUDA
        the chunk is one block.
        """
        out_bytes = rows * cols * out.itemsize
        io = slot.tensor if self.dev_io is None else self.dev_io
        stored = out.rows(io[:out_bytes], rows, cols)
        for b0, work in self._blocks(slot, src, row0, rows, cols, align):  # (blocks of whole aligned rows)
            for d in deltas:
                d.apply(work, row0 + b0, work.shape[0])
            block = stored[b0 : b0 + work.shape[0]]
            out.encode(work, block)
            # (torch sums no float8: FP8 codes, clamped, are finite when the float32 values are)
            self._check_finite(block if block.element_size() > 1 else work, tensor, row0 + b0)
        if self.dev_io is not None:
            slot.tensor[:out_bytes].copy_(io[:out_bytes])  # synchronous: the I/O thread reads it next
        return slot.bytes[:out_bytes]

    def first_pass(self, slot: Slot, *, src: Codec, row0: int, rows: int, cols: int, deltas: Sequence[Applied],
                   after: Sequence[FirstPass] = (), align: int = 1) -> None:
        """Rows of W through ``deltas`` in order, each first-pass delta observing them right after its
        own ``apply`` (W as the deltas before it made it); ``after`` observes the rows as merged."""
        from ..deltas import FirstPass

        for b0, work in self._blocks(slot, src, row0, rows, cols, align):
            for d in deltas:
                d.apply(work, row0 + b0, work.shape[0])
                if isinstance(d, FirstPass):
                    d.observe(work, row0 + b0)
            for o in after:
                o.observe(work, row0 + b0)

    def _blocks(self, slot: Slot, src: Codec, row0: int, rows: int, cols: int,
                align: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The chunk's raw rows widened to float32, block by block: (first row, work (k, cols)).

        Raw bytes sit at the end of the slot (see ``raw_bytes``); on CUDA they go to the device first
        and the chunk is one block; on the CPU blocks hold about BLOCK_ELEMENTS, whole rows.
        """
        n = rows * cols
        raw_at, raw_end = n * self.io_itemsize - src.nbytes(n), n * self.io_itemsize
        io = slot.tensor if self.dev_io is None else self.dev_io
        if self.dev_io is not None:
            io[raw_at:raw_end].copy_(slot.tensor[raw_at:raw_end], non_blocking=True)
        raw = src.rows(io[raw_at:raw_end], rows, cols)
        step = rows if self.dev_io is not None else max(align, BLOCK_ELEMENTS // cols // align * align)
        for b0 in range(0, rows, step):
            k = min(step, rows - b0)
            work = self.work[: k * cols].view(k, cols)
            src.decode(src.block(raw, b0, k), work, row0 + b0)
            yield b0, work

    @staticmethod
    def _check_finite(block: torch.Tensor, tensor: str, row0: int) -> None:
        # NaN and Inf propagate into the sum, so a finite sum clears the block with one reduction
        # and one read-back (measured here: half the time of aminmax on a bfloat16 block). A sum
        # that is not finite may be a mere overflow of the sum: min/max (which, unlike isfinite(),
        # allocate nothing of the block's size) decide. Rounding overflow to fp16 shows as Inf.
        if math.isfinite(block.sum().item()):
            return
        lo, hi = torch.aminmax(block)
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            raise NonFiniteError(
                f"{tensor!r} produced NaN or Inf (rows {row0}..{row0 + block.shape[0] - 1}) in the output: the "
                "adapter or base holds non-finite values, or a value overflows the output dtype (choose a wider --dtype)"
            )

    def close(self) -> None:
        """Free the buffers once no write from them is pending."""
        for slot in self.slots:
            slot.free.wait()
        del self.work, self.dev_io, self.slots
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
