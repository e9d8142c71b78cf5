"""BOFT as PEFT merges it: ``W' = (W M^T) * s``, M = B_{N-1} ... B_0 the product of N butterfly
factors, B_i = P_i D_i P_i^T with D_i block-diagonal (each block the exact Cayley map of the skew part
of its saved matrix, Q = (I - S)(I + S)^-1, S = (B - B^T) / 2; ``boft_R`` (N, blocks, b, b)) and P_i the
permutation matrix of factor i (``P[j, perm[j]] = 1``); ``boft_s`` (out, 1) scales the rows.

A row x becomes x B_0^T B_1^T ...: for each factor, its columns permuted by P_i (``y[perm] = x``),
rotated block by block (as OFT's), permuted back (``x = z[perm]``). perm_i is PEFT's block butterfly
permutation: in each of the ``blocks / 2^i`` groups of columns, the half-blocks (b / 2 columns) taken
evens first, then odds; with one factor it is the identity. Rotations are built once per tensor in
float64, applied in float32.
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


def butterfly_perm(n: int, groups: int, half: int, factors: int) -> list[int]:
    """The column order of one butterfly factor: n columns in ``groups`` groups, each group's runs of
    ``half`` columns reordered evens first, then odds (identity with a single factor)."""
    if factors == 1:
        return list(range(n))
    size = n // groups
    runs = size // half
    order = [r * half + k for r in [*range(0, runs, 2), *range(1, runs, 2)] for k in range(half)]
    return [g * size + j for g in range(groups) for j in order]


class Butterfly:
    def __init__(self, factors: list[tuple[torch.Tensor | None, Rotate]], s: torch.Tensor) -> None:
        self.factors, self.s = factors, s  # (perm or None for the identity, rotation), s (out, 1)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        for perm, rotate in self.factors:
            if perm is None:
                rotate.apply(work, row0, rows)
                continue
            y = work.new_empty(work.shape)
            y[:, perm] = work
            rotate.apply(y, row0, rows)
            work.copy_(y[:, perm])
        work.mul_(self.s[row0 : row0 + rows])


@dataclass(frozen=True)
class Boft(ByRole):
    roles = ("R", "s")
    block_buffers = 2  # (a factor's permuted copy, and its rotation's)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        r, s = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        if (len(info.shape) != 2 or len(r) != 4 or r[2] != r[3] or r[1] * r[2] != info.shape[1]
                or s != (info.shape[0], 1) or (r[0] > 1 and (r[1] % 2 ** (r[0] - 1) or r[2] % 2))):
            return f"{d.lora.module}: boft_R {list(r)} and boft_s {list(s)} do not fit {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Butterfly:
        import torch

        r, s = (factors.get(d.adapter, k).double() for k in self.factor_keys(d))
        n, blocks, b = r.shape[0], r.shape[1], r.shape[2]
        skew = (r - r.transpose(-1, -2)) / 2  # (factors, blocks, b, b)
        eye = torch.eye(b, dtype=skew.dtype, device=skew.device).expand_as(skew)
        q = torch.linalg.solve(eye + skew, eye - skew, left=False).float()
        cols = blocks * b
        perms = [None if n == 1 else factors.put(torch.tensor(butterfly_perm(cols, blocks // 2**i, b // 2, n)))
                 for i in range(n)]
        return Butterfly([(perm, Rotate(q[i])) for i, perm in enumerate(perms)], s.float())


BOFT = Boft()
