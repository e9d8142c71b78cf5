"""Memory budgets: parsing sizes, reading the process's RSS and its peak.

No torch here, so ``streammerge --help`` stays instant.
"""

from __future__ import annotations

import os
import re
import resource

from .errors import DeviceError

DEFAULT_MAX_MEM = 2 * 1024**3  # 2 GiB: large chunks already saturate disk and BLAS well below this

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse ``512MB``, ``20GB`` (powers of 1000), ``20GiB`` or ``20G`` (powers of 1024) to bytes."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: write a number and a unit, e.g. 512MB, 20GB, 20GiB"
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def format_size(n: float) -> str:
    """Human-readable bytes with binary units: ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so a later reading covers only the merge.

    Linux only (writing 5 to clear_refs); returns False where it is not possible.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size in bytes: VmHWM (since the last reset) or the process maximum."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def chunk_capacity(budget: int, *, fixed: int, bytes_per_element: int, minimum_elements: int) -> int:
    """Elements of work that fit in ``budget`` after ``fixed`` bytes (adapter factors) are held.

    Raises DeviceError naming the smallest budget that would work.
    """
    free = budget - fixed
    elements = max(free, 0) // bytes_per_element
    if elements < minimum_elements:
        needed = fixed + minimum_elements * bytes_per_element
        raise DeviceError(
            f"--max-mem {budget} bytes cannot hold one row of the largest tensor plus its adapter "
            f"factors, what their method derives from them (a whole tensor for OSF) and a GGUF output's "
            f"conversion ({needed} bytes needed); raise --max-mem to at least {format_size(needed)}"
        )
    return elements
