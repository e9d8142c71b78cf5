"""Readers (rows of ``methods.BUILDERS``) of the PEFT methods whose delta depends on the base weight
itself (``deltas/fromweight.py``: DEFT and PaRa, PEANuT, FRoD's bases shared by a category of modules),
of the spectral ones (FourierFT, WaveFT) and of GLoRA."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
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


def glora(spec: Spec) -> LoraModule:
    """GLoRA: every path saved as Xd and Xu, X or zeros; the bias too when C, D or E are saved."""
    for x in "ABCDE":
        held = {r for r in spec.roles if r.startswith(f"{x}_")}
        if held not in ({f"{x}_d", f"{x}_u"}, {f"{x}_x"}, {f"{x}_0"}):
            raise InputError(f"{spec.where}: GLoRA {spec.module!r} path {x} has {sorted(held)}; expected Xd and Xu, "
                             "X, or zeros")
    bias = any(f"{x}_0" not in spec.roles for x in "CDE")
    return spec.plain(spec.roles["A_d"].shape[1] if "A_d" in spec.roles else 0,
                      bias_method="glora_bias" if bias else None)


def _check_wavelet(family: str, where: Path) -> None:
    """A WaveFT family whose filters are read: Haar built in; db2-db10, sym2-sym10, coif1-coif3 from PyWavelets."""
    from ..deltas.spectral import FILTERS_NOT_PYWT

    if family in ("db1", "haar"):
        return
    if family in FILTERS_NOT_PYWT or not re.fullmatch(r"(db([2-9]|10)|sym([2-9]|10)|coif[1-3])", family):
        raise UnsupportedError(f"{where}: WaveFT with wavelet_family {family!r} is not merged by this version: PEFT's "
                               "own filters for it are not PyWavelets' (db1-db10, sym2-sym10 and coif1-coif3 are read)")
    try:
        import pywt  # noqa: F401
    except ImportError:
        raise UnsupportedError(f"{where}: WaveFT with wavelet_family {family!r} needs its filters from PyWavelets: "
                               "pip install 'streammerge[wavelets]'") from None


def fourierft(spec: Spec) -> LoraModule:
    """FourierFT and WaveFT: n (their r here) spectrum entries, scaled by the config's scaling; the seed
    locates them. WaveFT's inverse transform is read for the Haar wavelet (db1) only."""
    scaling, seed = spec.config.get("scaling"), spec.config.get("random_loc_seed")
    if spec.peft_type == "WAVEFT" and spec.config.get("use_idwt", True):
        _check_wavelet(str(spec.config.get("wavelet_family", "db1")), spec.where)
    if not isinstance(scaling, (int, float)) or not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"{spec.where}: FourierFT needs a number scaling and an integer random_loc_seed, got "
                         f"scaling={scaling!r}, random_loc_seed={seed!r}")
    return spec.plain(spec.roles["spectrum"].numel, scaling=float(scaling))
