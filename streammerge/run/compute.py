"""The compute side of a merge: torch loaded in the background, the device resolved once, one set
of chunk buffers shared by every output, and the CUDA out-of-memory fallback.

torch takes about a second to import; it loads in a thread while the plan is built, and on the
CPU the first shard's untouched tensors are already being copied before it is needed.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from ..memory import current_rss, format_size, reset_peak_rss
from .workingset import SLOTS, WorkingSet

if TYPE_CHECKING:
    import torch

    from .processor import Processor

log = logging.getLogger(__name__)


class Runtime:
    """Imports the torch side (``run.device``, ``run.processor``) in the background."""

    MODULES = ("device", "processor")

    def __init__(self) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._load, name="streammerge-import", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            for name in self.MODULES:
                importlib.import_module(f"{__package__}.{name}")
        except BaseException as exc:  # re-raised in the caller of get()
            self._error = exc

    def ready(self) -> bool:
        return not self._thread.is_alive()

    def get(self, name: str) -> ModuleType:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return sys.modules[f"{__package__}.{name}"]


@dataclass(frozen=True)
class ComputeSummary:
    """For the report: the device resolved, the baseline RSS, the chunk in use at the end (after any
    fallback) and the GPU peak."""

    device: str
    baseline_rss: int
    chunk_elements: int
    peak_gpu: int | None


class Compute:
    """The device and the buffers every output's merge shares (one tensor is merged at a time)."""

    def __init__(self, working_set: WorkingSet, device: str, runtime: Runtime, *, reserve_core: bool) -> None:
        self.working_set = working_set
        self.device_spec = device
        self.runtime = runtime
        self.reserve_core = reserve_core  # leave a core to the checksum thread
        self._device: torch.device | None = None
        self.processor: Processor | None = None
        self.baseline_rss = 0
        self.notes: list[str] = []  # what the fallback did, for the report
        self._threads_before = 0

    def ready(self) -> bool:
        return self.runtime.ready()

    @property
    def device(self) -> torch.device:
        """The resolved device (waits for torch); a missing CUDA device raises DeviceError."""
        if self._device is None:
            self._device = self.runtime.get("device").resolve_device(self.device_spec)
        return self._device

    def device_kind(self) -> str:
        """What the bytes depend on: ``cpu`` or ``cuda`` (for the resume fingerprints)."""
        return self.device.type

    def start(self) -> Processor:
        """The buffers, allocated once. The RSS at this point (interpreter + libraries + plan) is the
        baseline the budget sits on."""
        if self.processor is None:
            device, dev = self.device, self.runtime.get("device")
            reset_peak_rss()
            self.baseline_rss = current_rss()
            self._threads_before = dev.prepare_device(device, reserve=1 if self.reserve_core else 0)
            self.processor = self._allocate(device, self.working_set.chunk_elements)
        return self.processor

    def _allocate(self, device: torch.device, capacity: int) -> Processor:
        ws = self.working_set
        log.info("chunk buffers on %s: %d elements (%s)", device, capacity,
                 format_size(capacity * (4 + SLOTS * ws.io_itemsize)))
        return self.runtime.get("processor").Processor(device, capacity=capacity, io_itemsize=ws.io_itemsize,
                                                       widest=ws.widest, slots=SLOTS)

    def retry_smaller(self, exc: BaseException, tensor: str) -> bool:
        """After ``exc`` while merging ``tensor``: on CUDA out-of-memory, halve the chunk (below one row,
        move to the CPU) and say so; True when the tensor should be merged again."""
        proc = self.processor
        if proc is None or proc.device.type != "cuda" or not self.runtime.get("device").is_cuda_oom(exc):
            return False
        capacity = proc.capacity // 2
        proc.close()
        if capacity >= self.working_set.widest:
            note = f"CUDA out of memory on {tensor}: chunk shrunk to {capacity} elements"
            self.processor = self._allocate(proc.device, capacity)
        else:
            note = f"CUDA out of memory on {tensor} even at one row: finishing the merge on the CPU"
            self.processor = self._allocate(self.runtime.get("device").cpu_device(), self.working_set.chunk_elements)
        log.warning(note)
        self.notes.append(note)
        return True

    def summary(self) -> ComputeSummary:
        proc = self.start()
        return ComputeSummary(str(self.device), self.baseline_rss, proc.capacity,
                              self.runtime.get("device").peak_gpu(self.device))

    def close(self) -> None:
        if self.processor is not None:
            self.processor.close()
            if self._threads_before:
                self.runtime.get("device").set_threads(self._threads_before)  # the caller's torch setting back
        self.processor = None
