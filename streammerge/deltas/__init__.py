"""Deltas: how an adapter module changes a float32 block of rows of one base tensor.

Each method is registered by the name the plan gives it (``Delta.method``) and answers: which
adapter tensors it holds on the merge device (``factor_keys``, for the memory budget), how many
float32 temporaries of a block's size its ``apply`` makes (``block_buffers``, for the budget too),
what it derives and holds beyond them (``held_floats``), whether its tensors fit a base tensor
(``check``, from headers: the plan's shape checks), and how to load itself (``load``) into an
object whose ``apply(work, row0, rows)`` changes rows ``[row0, row0 + rows)`` held in ``work`` in
place (a loaded delta that must see every row first is a ``FirstPass``).

A new PEFT method is a reader row in ``adapters/methods.py``, a module here (``roles.ByRole`` gives
what the non-LoRA ones share), a row in ``METHODS`` and its float64 reading for verify
(``checkrows.py`` / ``checkwhole.py``); the engine never branches on the method. Methods, by module:
LoRA and its variants (``lora``, ``dora``); IA3 (``ia3``); LoHa, LoKr, VeRA, PVeRA, AdaLoRA, SHiRA,
supertuning, C3A (``additive``); DeLoRA, HiRA, BEFT, RandLoRA, GraLoRA, VB-LoRA, UniLoRA, TinyLoRA
(``structured``); OFT (``oft``); BOFT (``boft``); HRA (``hra``); RoAd (``road``); MiSS (``miss``);
DEFT, PEANuT, FRoD, OSF (``fromweight``: deltas that depend on W itself); FourierFT, WaveFT
(``spectral``); GLoRA (``glora``).

Imports no torch: the plan asks ``factor_keys`` from headers alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from . import additive, boft, dora, fromweight, glora, hra, ia3, lora, miss, oft, road, spectral, structured

if TYPE_CHECKING:
    import torch

    from ..adapters.types import LoraAdapter
    from ..formats.header import TensorInfo
    from ..plan.types import Delta


class Factors(Protocol):
    """Where a delta's tensors come from at merge time (float32)."""

    def get(self, adapter: LoraAdapter, key: str) -> torch.Tensor:
        """``key`` of ``adapter`` on the merge device."""
        ...

    def shared(self, adapter: LoraAdapter, key: str) -> torch.Tensor:
        """``key`` of ``adapter`` in host memory, kept for the next deltas that slice it (fused experts)."""
        ...

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the merge device."""
        ...


class Applied(Protocol):
    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None: ...


@runtime_checkable
class FirstPass(Applied, Protocol):
    """A delta that must see every row of W before the merge pass (column norms, W's low-rank
    projections, the whole tensor): in the first pass each observes the rows right after its own
    ``apply`` (which may change nothing until ``end``), so it sees W as the deltas before it made it."""

    def begin(self, cols: int, device: torch.device) -> None: ...

    def observe(self, work: torch.Tensor, row0: int) -> None: ...

    def end(self) -> None: ...


class Method(Protocol):
    @property
    def block_buffers(self) -> int:
        """float32 temporaries of a block's size its ``apply`` makes (the working set counts them)."""
        ...

    def factor_keys(self, d: Delta) -> list[str]: ...

    def held_floats(self, d: Delta) -> int:
        """float32 values its ``load`` derives and holds beyond the factors (first-pass sums, a copy of
        the whole tensor); the working set counts them with the factors."""
        ...

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        """What is wrong with ``d`` on ``tensor`` (shapes), from headers; None when it fits."""
        ...

    def load(self, d: Delta, factors: Factors) -> Applied: ...


METHODS: dict[str, Method] = {
    "lora": lora.LORA,
    "lora_T": lora.LORA_T,
    "lora_bias": lora.LORA_BIAS,
    "lora_expert": lora.LORA_EXPERT,
    "dora": dora.DORA,
    "dora_T": dora.DORA_T,
    "ia3_rows": ia3.IA3_ROWS,
    "ia3_columns": ia3.IA3_COLUMNS,
    "ia3_bias": ia3.IA3_BIAS,
    "loha": additive.LOHA,
    "lokr": additive.LOKR,
    "vera": additive.VERA,
    "adalora": additive.ADALORA,
    "oft": oft.OFT,
    "hra": hra.HRA,
    "shira": additive.SHIRA,
    "road": road.ROAD,
    "miss": miss.MISS,
    "c3a": additive.C3A_,
    "delora": structured.DELORA,
    "hira": structured.HIRA,
    "pvera": additive.PVERA,
    "beft": structured.BEFT,
    "randlora": structured.RANDLORA,
    "gralora": structured.GRALORA,
    "boft": boft.BOFT,
    "vblora": structured.VBLORA,
    "supertuning": additive.SUPERTUNING,
    "unilora": structured.UNILORA,
    "deft": fromweight.DEFT,
    "peanut": fromweight.PEANUT,
    "frod": fromweight.FROD,
    "osf": fromweight.OSF,
    "fourierft": spectral.FOURIERFT,
    "waveft": spectral.WAVEFT,
    "tinylora": structured.TINYLORA,
    "glora": glora.GLORA,
    "glora_bias": glora.GLORA_BIAS,
}


# methods that scale the weight rather than add to it: with other deltas on the same weight the
# order of the adapters matters (each applies to what the ones before it made)
MULTIPLICATIVE = frozenset({"ia3_rows", "ia3_columns", "ia3_bias", "oft", "boft", "hra", "road", "hira", "miss", "deft",
                            "peanut", "frod", "osf", "glora", "glora_bias"})


def method(name: str) -> Method:
    return METHODS[name]


def load(d: Delta, factors: Factors) -> Applied:
    return METHODS[d.method].load(d, factors)
