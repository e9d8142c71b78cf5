"""IA3: a learned vector ``l`` scales the weight (PEFT's ``merge``: ``W * l``), with s = the adapter's
weight (several IA3 adapters combine as PEFT's weighted adapter: ``l = sum w_i l_i``):
- ``ia3_rows``:    ``l`` (out, 1): W[rows] *= s * l[rows]     (attention projections)
- ``ia3_columns``: ``l`` (1, in):  W[rows] *= s * l[None, :]   (``feedforward_modules``: the input side)
- ``ia3_bias``:    the layer's bias (one row of ``out``) *= s * l, with ``ia3_rows``.
Multiplicative: with other adapters on the same weight it applies in the order the adapters are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .roles import ByRole

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors


class ScaleRows:
    def __init__(self, v: torch.Tensor) -> None:
        self.v = v  # (out,)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        work.mul_(self.v[row0 : row0 + rows, None])


class ScaleColumns(ScaleRows):
    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        work.mul_(self.v[None, :])


@dataclass(frozen=True)
class Ia3(ByRole):
    side: str  # "rows", "columns" or "bias"
    roles = ("l",)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        n = d.adapter.tensors[d.lora.key("l")].numel
        axis = {"rows": 0, "columns": 1, "bias": 0}[self.side]
        want = 1 if self.side == "bias" else 2
        if len(info.shape) != want or info.shape[axis] != n:
            return f"{d.lora.module}: ia3_l has {n} entries but {tensor} is {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> ScaleRows:
        v = factors.get(d.adapter, d.lora.key("l")).reshape(-1) * d.scale
        return (ScaleRows if self.side == "rows" else ScaleColumns)(v)


IA3_ROWS, IA3_COLUMNS, IA3_BIAS = Ia3("rows"), Ia3("columns"), Ia3("bias")
