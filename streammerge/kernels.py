"""The arithmetic: ``W + sum_i s_i * (B_i @ A_i)`` on a chunk of rows, in float32, rounded once.

A ``Processor`` owns the reusable buffers for one device, allocated once from the budget:
- two host ``Slot``s: raw bytes read from the base, reused for the rounded output (pinned on
  CUDA); one is filled while the I/O thread writes the other;
- ``work``: float32 accumulator on the device;
- ``dev_io``: on CUDA only, the device copy of the raw / rounded bytes.
No per-chunk allocation happens on the hot path.
"""

from __future__ import annotations

import math
import os

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import DeviceError, InputError
from .tensors import TORCH_DTYPES


@dataclass(frozen=True)
class Factors:
    """One delta's factors on the processor's device: A (r, in), B (out, r), scale; ``transposed``
    when the weight holds (B @ A).T (Conv1D, Embedding)."""

    A: torch.Tensor | None
    B: torch.Tensor
    scale: float
    transposed: bool = False
    magnitude: torch.Tensor | None = None  # DoRA m: (out,) rows of a Linear; (cols,) for Conv1D / Embedding
    column_scale: torch.Tensor | None = None  # column DoRA: m / ||column of W + dW||, from a first pass
    vector: bool = False  # lora_bias: B is lora_B.bias (cols,), added to a bias viewed as one row


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when present else CPU; an explicit CUDA device that is missing is an error."""
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"--device {spec!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device {spec!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {spec} was requested but CUDA is not available here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            "use --device cpu or --device auto"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return torch.device("cuda", index)


def is_cuda_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def zeros64(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64, device=device)


def as_ids(ids: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def cpu_device() -> torch.device:
    return torch.device("cpu")


def prepare_device(device: torch.device, *, reserve: int = 0) -> int:
    """TF32 off on CUDA. On the CPU, torch's pool leaves ``reserve`` cores to our other busy thread
    (the checksum), keeping at least one: measured on 2 cores, with both in torch's pool while the
    checksum thread also ran, the same merge arithmetic took 2.5x longer and the run 1.2x; without
    a checksum, the full pool was as fast or faster. OMP_NUM_THREADS, if set, wins.
    Returns torch's thread count before, for ``set_threads`` at the end."""
    before = torch.get_num_threads()
    if device.type == "cuda":
        # TF32 would round the factors to 10-bit mantissas; the merge must match the CPU path.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores - reserve))
    return before


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def peak_gpu(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


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

    def raw_bytes(self, slot: Slot, elements: int, src_itemsize: int) -> memoryview:
        """Where the caller reads a chunk's raw bytes: the END of the slot's first ``elements * k``
        bytes. Outputs are written from the start, block after block; an output block never reaches
        raw bytes not yet consumed, whichever of the two itemsizes is larger."""
        end = elements * self.io_itemsize
        return slot.bytes[end - elements * src_itemsize : end]

    def merge_rows(
        self,
        slot: Slot,
        *,
        src_dtype: str,
        out_dtype: str,
        row0: int,
        rows: int,
        cols: int,
        factors: list[Factors],
        tensor: str,
        tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> memoryview:
        """Merge rows ``[row0, row0+rows)`` whose raw bytes are already in ``raw_bytes(slot, ...)``.

        On the CPU the chunk is worked in blocks of whole rows of about BLOCK_ELEMENTS, so that the
        float32 accumulator stays in cache between the passes (widen, add, round, check); on CUDA
        the chunk is one block. Returns the rounded output bytes (a view of ``slot``).
        """
        out_t = TORCH_DTYPES[out_dtype]
        out_bytes = rows * cols * out_t.itemsize
        io = slot.tensor if self.dev_io is None else self.dev_io
        out = io[:out_bytes].view(out_t).view(rows, cols)
        for b0, work in self._blocks(slot, src_dtype, rows, cols):
            self._apply(work, factors, tokens, row0 + b0, work.shape[0])
            block = out[b0 : b0 + work.shape[0]]
            block.copy_(work)
            if factors or tokens is not None:
                self._check_finite(block, tensor, row0 + b0)
        if self.dev_io is not None:
            slot.tensor[:out_bytes].copy_(io[:out_bytes])  # synchronous: the I/O thread reads it next
        return slot.bytes[:out_bytes]

    def column_sumsq(self, slot: Slot, *, src_dtype: str, row0: int, rows: int, cols: int,
                     factors: list[Factors], acc: torch.Tensor) -> None:
        """First pass of column DoRA: add the squares of ``W + dW`` (float32, as merged) per column to
        the float64 ``acc`` (cols,), for rows ``[row0, row0+rows)`` whose raw bytes are in ``slot``."""
        for b0, work in self._blocks(slot, src_dtype, rows, cols):
            self._apply(work, factors, None, row0 + b0, work.shape[0])
            acc += work.double().square().sum(dim=0)

    def _blocks(self, slot: Slot, src_dtype: str, rows: int, cols: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The chunk's raw rows widened to float32, block by block: (first row, work (k, cols)).

        Raw bytes sit at the end of the slot (see ``raw_bytes``); on CUDA they go to the device first
        and the chunk is one block; on the CPU blocks hold about BLOCK_ELEMENTS, whole rows.
        """
        n, src_t = rows * cols, TORCH_DTYPES[src_dtype]
        raw_at, raw_end = n * self.io_itemsize - n * src_t.itemsize, n * self.io_itemsize
        io = slot.tensor if self.dev_io is None else self.dev_io
        if self.dev_io is not None:
            io[raw_at:raw_end].copy_(slot.tensor[raw_at:raw_end], non_blocking=True)
        raw = io[raw_at:raw_end].view(src_t).view(rows, cols)
        step = rows if self.dev_io is not None else max(1, BLOCK_ELEMENTS // cols)
        for b0 in range(0, rows, step):
            k = min(step, rows - b0)
            work = self.work[: k * cols].view(k, cols)
            work.copy_(raw[b0 : b0 + k])
            yield b0, work

    @staticmethod
    def _apply(work: torch.Tensor, factors: list[Factors], tokens: tuple[torch.Tensor, torch.Tensor] | None,
               row0: int, rows: int) -> None:
        """Rows ``[row0, row0+rows)`` of the merged tensor, in the float32 ``work`` (rows, cols)."""
        for f in factors:
            if f.vector:
                work.add_(f.B.view(1, -1), alpha=f.scale)
            elif f.transposed:  # rows of (B @ A).T: (rows, r) @ (r, cols) = A[:, rows].T @ B.T
                work.addmm_(f.A[:, row0 : row0 + rows].t(), f.B.t(), alpha=f.scale)
            else:  # (rows, r) @ (r, cols), accumulated in place
                work.addmm_(f.B[row0 : row0 + rows], f.A, alpha=f.scale)
            if f.magnitude is not None and not f.transposed:  # DoRA: rows rescaled to m / ||W + dW||_2
                norms = torch.linalg.vector_norm(work, dim=1)  # (rows,): blocks hold whole rows
                work.mul_((f.magnitude[row0 : row0 + rows] / norms).unsqueeze(1))
            if f.column_scale is not None:  # DoRA on Conv1D / Embedding: columns, scale from the first pass
                work.mul_(f.column_scale.view(1, -1))
        if tokens is not None:  # token rows replaced by the adapter's values: ids (k,), values (k, cols)
            ids, values = tokens
            inside = (ids >= row0) & (ids < row0 + rows)
            work[ids[inside] - row0] = values[inside]

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
                f"merging {tensor!r} produced NaN or Inf (rows {row0}..{row0 + block.shape[0] - 1}); "
                "the adapter or base holds non-finite or overflowing values"
            )

    def close(self) -> None:
        """Free the buffers once no write from them is pending."""
        for slot in self.slots:
            slot.free.wait()
        del self.work, self.dev_io, self.slots
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
