"""BOFT with one butterfly factor, as PEFT merges it: ``W' = (W R^T) * s`` with R block-diagonal,
each block the exact Cayley map of the skew part of its saved matrix, Q = (I - S)(I + S)^-1 with
S = (B - B^T) / 2 (``boft_R`` (1, blocks, b, b)), and ``boft_s`` (out, 1) scaling the rows. The
rotations are built once per tensor in float64; a row chunk is rotated block by block (as OFT's),
then scaled. More butterfly factors (``boft_R`` with a first dimension above 1: PEFT's CUDA
extension) are refused: their permutations could not be checked against PEFT here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .oft import Rotate
from .roles import ByRole

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors


class RotateScale(Rotate):
    def __init__(self, r: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__(r)
        self.s = s  # (out, 1)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        super().apply(work, row0, rows)
        work.mul_(self.s[row0 : row0 + rows])


@dataclass(frozen=True)
class Boft(ByRole):
    roles = ("R", "s")
    block_buffers = 1

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        r, s = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        if (len(info.shape) != 2 or len(r) != 4 or r[0] != 1 or r[2] != r[3] or r[1] * r[2] != info.shape[1]
                or s != (info.shape[0], 1)):
            return f"{d.lora.module}: boft_R {list(r)} and boft_s {list(s)} do not fit {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> RotateScale:
        import torch

        r, s = (factors.get(d.adapter, k).double() for k in self.factor_keys(d))
        skew = (r[0] - r[0].transpose(1, 2)) / 2  # (blocks, b, b)
        eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
        return RotateScale(torch.linalg.solve(eye + skew, eye - skew, left=False).float(), s.float())


BOFT = Boft()
