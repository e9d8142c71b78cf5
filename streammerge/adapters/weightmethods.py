"""Readers of the PEFT methods whose delta depends on the base weight itself (``deltas/fromweight.py``):
DEFT and PaRa, PEANuT, and FRoD's bases shared by a category of modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import InputError, UnsupportedError

if TYPE_CHECKING:
    from .methods import Spec
    from .types import LoraModule

MAX_DEPTH = 64  # PEANuT's encoder / decoder layers read
# peft_type -> (the prefix of its tensors shared by a category of modules, module -> {shared key: role})
SHARED_BY_MODULE: dict[str, tuple[str, Callable[[str], dict[str, str]]]] = {
    "FROD": ("base_model.frod_", lambda m: {f"base_model.frod_{x}.{_frod_category(m)}": role for x, role in
                                            (("V", "V"), ("s_indices", "indices"), ("s_size", "size"))}),
    "TINYLORA": ("base_model.tinylora_v.", lambda m: {}),  # (which one a module uses: adapters/tinylora.py)
}


def _frod_category(module: str) -> str:
    """FRoD's sharing category of a module path (PEFT's rule: its last two names, or the last after a layer
    index; a BERT attention's output.dense is attention_output)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    return "attention_output" if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention" else category


def deft(spec: Spec) -> LoraModule:
    """DEFT (and PaRa, para=true: no R): scaling alpha / r when alpha is set, else 1."""
    para = bool(spec.config.get("para"))
    spec.needs({"P"}, *([] if para else [{"R"}]))
    if spec.config.get("decomposition_method", "relu") not in ("relu", "qr"):
        raise UnsupportedError(f"{spec.where}: DEFT decomposition_method {spec.config.get('decomposition_method')!r} "
                               "is not read by this version (relu and qr are)")
    r, alpha = spec.roles["P"].shape[1], spec.config.get("alpha")
    scaling = float(alpha) / r if isinstance(alpha, (int, float)) and alpha else 1.0
    return spec.plain(r, lora_alpha=float(alpha or 0), scaling=scaling)


def peanut(spec: Spec) -> LoraModule:
    """PEANuT: depth encoders and decoders (r x r), its activation, scaling from the config."""
    from ..deltas.fromweight import ACTIVATION_NAMES

    spec.needs({"A"}, {"B"})
    depth, act, scaling = spec.config.get("depth", 0), spec.config.get("act_fn", "relu"), spec.config.get("scaling", 1.0)
    saved = {role for role in spec.roles if role[:3] in ("enc", "dec")}
    if not isinstance(depth, int) or saved != {f"{s}{i}" for s in ("enc", "dec") for i in range(depth)}:
        raise InputError(f"{spec.where}: PEANuT {spec.module!r} has {len(saved)} encoder/decoder layers for depth "
                         f"{depth!r} (at most {MAX_DEPTH} are read)")
    if act not in ACTIVATION_NAMES or not isinstance(scaling, (int, float)):
        raise UnsupportedError(f"{spec.where}: PEANuT act_fn {act!r} (scaling {scaling!r}) is not read by this version "
                               f"({', '.join(ACTIVATION_NAMES)} are)")
    return spec.plain(spec.roles["A"].shape[0], scaling=float(scaling))
