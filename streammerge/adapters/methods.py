"""PEFT adapters of methods other than LoRA, read into the same ``LoraAdapter``: one module per
adapted layer, with its method (a row of the delta registry) and its tensors by role. The saved
tensors decide the layout, not the config (e.g. the shape of IA3's vector says which side it scales).

- IA3: ``<m>.ia3_l`` (out, 1) scales W's rows (and the layer's bias); (1, in) scales its columns
  (``feedforward_modules``). An untrained IA3 is all ones.
- LoHa: ``<m>.hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``, ``hada_w2_b``:
  delta = alpha / r * (w1a @ w1b) * (w2a @ w2b) (Hadamard product).
- LoKr: ``<m>.lokr_w1`` (a1, a2) or ``lokr_w1_a`` (a1, r) @ ``lokr_w1_b`` (r, a2); ``lokr_w2`` (b1, b2)
  or ``lokr_w2_a`` @ ``lokr_w2_b``: delta = alpha / r * kron(w1, w2), (a1 * b1, a2 * b2).
r and alpha per module as PEFT reads them (``rank_pattern`` / ``alpha_pattern``). The convolution
forms (``hada_t1``/``hada_t2``, ``lokr_t2``) and Conv1D layouts (``fan_in_fan_out``) are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import InputError, PlanError, UnsupportedError
from ..formats.header import TensorInfo
from .peft import BASE_LAYER_SUFFIX, EMBEDDING_LAYERS, PEFT_PREFIX, _index_tensors, _pattern_value, _saved_module
from .types import LoraAdapter, LoraModule

# peft_type -> saved tensor suffix -> role
ROLES: dict[str, dict[str, str]] = {
    "IA3": {"ia3_l": "l"},
    "LOHA": {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
             "hada_t1": "t1", "hada_t2": "t2"},
    "LOKR": {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
             "lokr_w2_b": "w2b", "lokr_t2": "t2"},
}
CONVOLUTION_ROLES = {"t1", "t2"}


def _scaling(config: dict[str, Any], module: str, where: Path) -> tuple[int, float, float]:
    """r, alpha and alpha / r of one LyCORIS module (rank_pattern / alpha_pattern as PEFT matches them)."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("alpha"))
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)):
        raise InputError(f"{where}: module {module!r} needs an integer r > 0 and a number alpha, got r={r!r}, "
                         f"alpha={alpha!r}")
    return r, float(alpha), float(alpha) / r


def _module(peft_type: str, config: dict[str, Any], module: str, roles: dict[str, TensorInfo],
            where: Path) -> LoraModule:
    if CONVOLUTION_ROLES & set(roles):
        raise UnsupportedError(f"{where}: {module!r} holds {peft_type}'s convolution (CP) factors; streammerge "
                               "merges its Linear form only")
    keys = tuple(sorted((role, info.name) for role, info in roles.items()))
    if peft_type == "IA3":
        shape = roles["l"].shape
        if len(shape) != 2 or 1 not in shape:
            raise InputError(f"{where}: {module!r} has ia3_l {list(shape)}; expected [out, 1] or [1, in]")
        output_side = shape[1] == 1 and shape[0] != 1
        return LoraModule(module, "", "", 0, 1.0, 1.0, method="ia3_rows" if output_side else "ia3_columns",
                          keys=keys, bias_method="ia3_bias" if output_side else None)
    needed = [{"w1a", "w1b", "w2a", "w2b"}] if peft_type == "LOHA" else [{"w1"} | {"w1a", "w1b"}, {"w2"} | {"w2a", "w2b"}]
    for group in needed:
        present = group & set(roles)
        if not present or (peft_type == "LOKR" and present not in ({"w1"}, {"w1a", "w1b"}, {"w2"}, {"w2a", "w2b"})):
            raise InputError(f"{where}: {module!r} has {sorted(roles)}; {peft_type} needs {sorted(group)}")
    r, alpha, scaling = _scaling(config, module, where)
    return LoraModule(module, "", "", r, alpha, scaling, method=peft_type.lower(), keys=keys)


def read_method_adapter(path: Path, config: dict[str, Any], *, weight: float) -> LoraAdapter:
    """A PEFT adapter of one of ``ROLES``' methods; its modules_to_save tensors replace the base's."""
    peft_type = str(config.get("peft_type"))
    where = path / "adapter_config.json"
    if config.get("fan_in_fan_out"):
        raise UnsupportedError(f"{where}: {peft_type} with fan_in_fan_out (Conv1D layers, GPT-2 style) is not merged "
                               "by this version")
    weights_path, tensors, header, state = _index_tensors(path)
    suffixes = ROLES[peft_type]
    pattern = re.compile(rf"^(?P<module>.+)\.(?P<suffix>{'|'.join(sorted(suffixes, key=len, reverse=True))})$")
    grouped: dict[str, dict[str, TensorInfo]] = {}
    replacements: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        match = pattern.match(key)
        param_path = key.removeprefix(PEFT_PREFIX)
        if match:
            grouped.setdefault(match["module"].removeprefix(PEFT_PREFIX), {})[suffixes[match["suffix"]]] = info
        elif _saved_module(param_path, (config.get("modules_to_save") or []) + EMBEDDING_LAYERS):
            if ".original_module." not in param_path:
                replacements.setdefault(param_path.replace(".modules_to_save.", ".").replace(BASE_LAYER_SUFFIX, ".weight"),
                                        info)
        else:
            raise PlanError(f"{weights_path}: tensor {key!r} is not one of {peft_type}'s (expected '<module>."
                            f"{'|'.join(suffixes)}'); refusing to drop it silently")
    modules = {m: _module(peft_type, config, m, roles, weights_path) for m, roles in grouped.items()}
    if not modules and not replacements:
        raise InputError(f"{weights_path}: the adapter holds no {peft_type} tensors")
    return LoraAdapter(path, weights_path, config, weight, tensors, modules, header, state, replacements)
