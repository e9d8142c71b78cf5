"""Adapter readers: each adapter format read into one ``LoraAdapter`` (``types.py``).

PEFT (``adapter_model.safetensors`` / ``.bin``) in ``peft.py``, mlx-lm (``adapters.safetensors``) in
``mlx.py``; the directory decides which. A new format is a new module and a row in ``_FORMATS``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError, UnsupportedError
from .mlx import WEIGHTS_NAME as MLX_WEIGHTS
from .mlx import read_mlx_adapter
from .methods import ROLES, read_method_adapter
from .peft import CONFIG_NAME, WEIGHTS_NAMES, read_peft_adapter
from .types import LoraAdapter, LoraModule, changes_something

__all__ = ["LoraAdapter", "LoraModule", "changes_something", "read_adapter", "CONFIG_NAME"]

Reader = Callable[..., LoraAdapter]


def _is_mlx(path: Path) -> bool:
    return (path / MLX_WEIGHTS).is_file() and not any((path / n).exists() for n in WEIGHTS_NAMES)


# (does this directory hold the format?, its reader): first match wins; PEFT is the default.
_FORMATS: tuple[tuple[Callable[[Path], bool], Reader], ...] = ((_is_mlx, read_mlx_adapter),)


def _not_peft(path: Path, config: dict[str, Any] | None) -> str | None:
    """What a directory is when it is an adapter of another library that cannot be merged into weights."""
    reft = path / "config.json"
    if config is None and reft.is_file() and "intervention" in reft.read_text(encoding="utf-8", errors="replace"):
        return "a ReFT (pyreft) intervention: it edits hidden representations at run time, not the weights"
    if config is not None and "peft_type" not in config and ({"reduction_factor", "adapter_residual_before_ln"}
                                                             & set(config.get("config") or config)):
        return "an AdapterHub bottleneck adapter: it adds layers to the model, which no weight merge can hold"
    return None


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        other = _not_peft(path, None)
        raise (UnsupportedError(f"adapter {path} is {other}; nothing streammerge can merge") if other else InputError(
            f"adapter {path}: no {CONFIG_NAME}; pass the directory written by PEFT's save_pretrained"))
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: must hold a JSON object")
    other = _not_peft(path, config)
    if other:
        raise UnsupportedError(f"adapter {path} is {other}; nothing streammerge can merge")
    return config


def read_adapter(path: Path, *, weight: float = 1.0) -> LoraAdapter:
    """Read and validate an adapter directory of any supported format."""
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise InputError(f"adapter {path}: {what} (pass the folder holding {CONFIG_NAME})")
    config = _read_config(path)
    if not math.isfinite(weight):
        raise InputError(f"adapter {path}: weight {weight!r} is not a finite number")
    for holds, reader in _FORMATS:
        if holds(path):
            return reader(path, config, weight=weight)
    if config.get("peft_type") in ROLES:  # IA3, LoHa, LoKr ...: adapters/methods.py
        return read_method_adapter(path, config, weight=weight)
    return read_peft_adapter(path, config, weight=weight)
