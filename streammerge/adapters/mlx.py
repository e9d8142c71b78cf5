"""mlx-lm adapters: ``adapters.safetensors`` + ``adapter_config.json``.

mlx-lm stores ``<module>.lora_a`` (in, r) and ``<module>.lora_b`` (r, out) and fuses
``W + scale * (lora_a @ lora_b).T``, with ``scale`` used as is (no division by r). In PEFT terms:
A = lora_a.T (r, in), B = lora_b.T (out, r), scaling = scale. The adapter is read into the same
``LoraAdapter`` as a PEFT one; ``transposed_keys`` makes ``load()`` return A and B the PEFT way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from ..errors import InputError, PlanError, UnsupportedError
from ..formats.checkpoint import check_inside
from ..formats.header import TensorInfo, read_header
from .types import LoraAdapter, LoraModule

WEIGHTS_NAME = "adapters.safetensors"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[ab])$")


def _check(config: dict[str, Any], where: Path) -> tuple[int, float]:
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise UnsupportedError(f"{where}: mlx-lm fine_tune_type {kind!r} is not merged by this version (only 'lora')")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise InputError(f"{where}: mlx-lm adapter config has no 'lora_parameters' object")
    rank, scale = params.get("rank"), params.get("scale")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise InputError(f"{where}: lora_parameters.rank must be a positive integer, got {rank!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise InputError(f"{where}: lora_parameters.scale must be a finite number, got {scale!r}")
    return rank, float(scale)


def read_mlx_adapter(path: Path, config: dict[str, Any], *, weight: float) -> LoraAdapter:
    check_inside(path / WEIGHTS_NAME, path)
    where = path / "adapter_config.json"
    rank, scale = _check(config, where)
    weights_path = path / WEIGHTS_NAME
    header = read_header(weights_path)
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in header.tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise PlanError(f"{weights_path}: tensor {key!r} is not an mlx-lm LoRA factor ('<module>.lora_a' / "
                            "'.lora_b'); refusing to drop it silently")
        if len(info.shape) != 2:
            raise UnsupportedError(f"{weights_path}: {key!r} is {len(info.shape)}-D (mlx-lm SwitchLinear experts "
                                   "are not merged by this version)")
        pairs.setdefault(match["module"], {})[match["factor"]] = info
    tensors: dict[str, TensorInfo] = {}
    modules = {}
    for module, factors in pairs.items():
        if set(factors) != {"a", "b"}:
            raise InputError(f"{weights_path}: module {module!r} lacks lora_{({'a', 'b'} - set(factors)).pop()}")
        a, b = factors["a"], factors["b"]  # (in, r), (r, out)
        if a.shape[1] != rank or b.shape[0] != rank:
            raise InputError(f"{weights_path}: {module!r} has lora_a {list(a.shape)} and lora_b {list(b.shape)} "
                             f"but the config says rank={rank}")
        tensors[a.name] = dataclasses.replace(a, shape=(a.shape[1], a.shape[0]))  # as PEFT's A (r, in)
        tensors[b.name] = dataclasses.replace(b, shape=(b.shape[1], b.shape[0]))  # as PEFT's B (out, r)
        modules[module] = LoraModule(module, a.name, b.name, rank, scale * rank, scale)
    if not modules:
        raise InputError(f"{weights_path}: the adapter holds no LoRA tensors")
    return LoraAdapter(path, weights_path, config, weight, tensors, modules, header, None,
                       transposed_keys=frozenset(tensors))
