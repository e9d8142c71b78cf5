"""Torch views of safetensors bytes: dtype names, and whole reads of small tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import read_tensor_bytes
from .header import SafetensorsHeader

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def read_tensor(path: Path, header: SafetensorsHeader, name: str) -> torch.Tensor:
    """Read one tensor whole (used for adapter factors, which are small)."""
    info = header.tensors[name]
    if info.dtype not in TORCH_DTYPES:
        raise_unsupported_dtype(path, name, info.dtype)
    buf = read_tensor_bytes(header, name)
    if not buf:
        return torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
    return torch.frombuffer(buf, dtype=TORCH_DTYPES[info.dtype]).reshape(info.shape)


def raise_unsupported_dtype(path: Path, name: str, dtype: str) -> None:
    from .errors import UnsupportedError

    raise UnsupportedError(
        f"{path}: tensor {name!r} is {dtype}; the merge arithmetic reads only "
        f"{', '.join(TORCH_DTYPES)} (quantized bases: point --base at the 16-bit checkpoint)"
    )
