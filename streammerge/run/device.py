"""The merge device: resolving ``--device``, preparing it, reading its peak memory (torch)."""

from __future__ import annotations

import os

import torch

from ..errors import DeviceError


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
