"""The working set: what a merge holds at most, from the plan and ``--max-mem``.

Memory model (``max_mem`` = M bytes, on the merge device):
  fixed   = float32 A and B of the tensor being merged (largest over the plan) + a 32 MiB reserve
            + what the outputs' sinks hold (a GGUF: its header and conversion pieces, ``output/gguf.py``)
  chunk   = E elements, each costing 4 bytes (float32 accumulator) + 2k bytes (two host I/O slots,
            k = the widest input or output itemsize), + 4 bytes for each temporary of a block's size a
            delta makes (LoHa: 2, LoKr: 1) and when a weight is re-quantized (the dequantized base
            rows it compares with, ``codecs.fp8_out``)
  E       = (M - fixed) // (4 + 2k), at least one row of the widest tensor, at most MAX_CHUNK
            elements and the largest merged tensor
On CUDA the accumulator and one I/O buffer of E*k bytes live on the GPU and the two pinned host
slots in RAM, so both stay under M.
Several outputs merged in one pass share one set of buffers sized for the largest need of any of
their plans (``WorkingSet.combine``): only one tensor is merged at a time, whichever output it is for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..deltas import method
from ..formats.header import DTYPE_SIZES
from ..memory import chunk_capacity
from ..plan.types import MergePlan

RESERVE = 32 * 1024**2  # runtime allocations outside our buffers (BLAS packing, copy bounce, files)
SLOTS = 2
# Larger chunks bring nothing but coarser overlap of compute and writes: measured on the CPU
# (3.85 GB, 2 cores, 5 interleaved pairs) a 16M-element cap beat whole-tensor (58.7M) chunks in
# every pair, 6.13 s against 6.55 s median, at less memory (the slots of a 1 GB budget halve).
MAX_CHUNK = 1 << 24


@dataclass(frozen=True)
class WorkingSet:
    """What the merge holds at most, from the plan and the budget (the memory model above)."""

    max_mem: int
    fixed_bytes: int  # float32 factors of the largest merged tensor + RESERVE + the sinks' own
    chunk_elements: int
    io_itemsize: int
    widest: int  # the longest row (times its row alignment): the smallest chunk possible
    floats: int = 1  # float32 buffers of the chunk's size: the accumulator, + a delta's temporaries (LoHa:
    # two products), + W0 when re-quantizing (fp8_out)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_elements * self.per_element(self.io_itemsize, self.floats)

    @staticmethod
    def per_element(io_itemsize: int, floats: int) -> int:
        return 4 * floats + SLOTS * io_itemsize

    @classmethod
    def of(cls, plan: MergePlan, max_mem: int, *, held: int = 0) -> WorkingSet:
        """``held``: bytes the outputs' sinks hold beside the buffers (a GGUF's header and conversion)."""
        rewritten = [t for t in plan.tensors() if t.rewritten]
        io_itemsize = max((max(DTYPE_SIZES[t.origin(plan.base).info.dtype], DTYPE_SIZES[t.out_dtype])
                           for t in rewritten), default=1)
        widest = max((t.rows_cols[1] * t.row_alignment for t in rewritten), default=1)
        floats = (1 + max((method(d.method).block_buffers for t in rewritten for d in t.deltas), default=0)
                  + any(t.requant is not None for t in rewritten))
        fixed = plan.max_factor_bytes + RESERVE + held
        chunk = chunk_capacity(max_mem, fixed=fixed, bytes_per_element=cls.per_element(io_itemsize, floats),
                               minimum_elements=widest)
        largest = max((t.info.numel for t in rewritten), default=1)
        return cls(max_mem, fixed, _capped(chunk, largest, widest), io_itemsize, widest, floats)

    @classmethod
    def combine(cls, sets: list[WorkingSet], max_mem: int) -> WorkingSet:
        """One set of buffers for several plans merged one tensor at a time: the largest factors,
        itemsize and row of any of them."""
        fixed = max(s.fixed_bytes for s in sets)
        io_itemsize = max(s.io_itemsize for s in sets)
        widest = max(s.widest for s in sets)
        floats = max(s.floats for s in sets)
        chunk = chunk_capacity(max_mem, fixed=fixed, bytes_per_element=cls.per_element(io_itemsize, floats),
                               minimum_elements=widest)
        return cls(max_mem, fixed, _capped(chunk, max(s.chunk_elements for s in sets), widest), io_itemsize, widest,
                   floats)

    def to_dict(self) -> dict[str, int]:
        return {"max_mem": self.max_mem, "factor_and_reserve_bytes": self.fixed_bytes,
                "chunk_elements": self.chunk_elements, "chunk_bytes": self.chunk_bytes,
                "working_set_bytes": self.fixed_bytes + self.chunk_bytes}


def _capped(chunk: int, largest: int, widest: int) -> int:
    """The budget's chunk, no larger than the largest merged tensor or MAX_CHUNK (whole rows: at
    least the widest row, which the budget was already checked to hold)."""
    return min(chunk, largest, max(MAX_CHUNK, widest))
