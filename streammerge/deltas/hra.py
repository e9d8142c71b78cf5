"""HRA (Householder reflection adaptation) as PEFT merges it: ``W' = W R`` with, from ``hra_u``
(in, r) and its columns u_i normalised,
- the chain (default): R = (I - 2 u_0 u_0^T)(I - 2 u_1 u_1^T) ... (I - 2 u_{r-1} u_{r-1}^T);
- ``apply_GS``: R = I - 2 Q Q^T, Q the Gram-Schmidt orthonormalisation of u's columns in order.
R is never built (it would be in x in): a row chunk takes the reflections one by one,
x <- x - 2 (x u_i) u_i^T, or the rank-r update x <- x - 2 (x Q) Q^T; float64 at load, float32 rows.
Multiplicative: with other deltas on the weight, the adapters' order matters.
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


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Columns of u orthonormalised in order (classical Gram-Schmidt, as PEFT's apply_GS)."""
    import torch

    q: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for w in q:
            v = v - (w @ v) * w
        q.append(v / v.norm())
    return torch.stack(q, dim=1)


class Reflections:
    def __init__(self, u: torch.Tensor, *, orthonormal: bool) -> None:
        self.u, self.orthonormal = u, orthonormal  # (in, r) float32

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        if self.orthonormal:  # x - 2 (x Q) Q^T
            work.addmm_(work @ self.u, self.u.t(), alpha=-2.0)
            return
        for i in range(self.u.shape[1]):  # x (I - 2 u_i u_i^T), in order
            u = self.u[:, i]
            work.addr_(work @ u, u, alpha=-2.0)


@dataclass(frozen=True)
class Hra(ByRole):
    roles = ("u",)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        shape = d.adapter.tensors[d.lora.key("u")].shape
        if len(info.shape) != 2 or len(shape) != 2 or shape[0] != info.shape[1]:
            return f"{d.lora.module}: hra_u {list(shape)} does not reflect the {info.shape[1:]} columns of {tensor}"
        return None

    def load(self, d: Delta, factors: Factors) -> Reflections:
        u = factors.get(d.adapter, d.lora.key("u")).double()
        gs = bool(d.adapter.config.get("apply_GS"))
        u = gram_schmidt(u) if gs else u / u.norm(dim=0)
        return Reflections(u.float(), orthonormal=gs)


HRA = Hra()
