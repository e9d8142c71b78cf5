"""DoRA: ``V = W + s B A`` rescaled to the magnitude vector m.

- ``dora`` (Linear): rows, ``W' = (m / ||V||_row)[:, None] * V``; a chunk holds whole rows, so the
  norms are computed inside it.
- ``dora_T`` (Conv1D, Embedding): columns, ``W' = V * (m / ||V||_col)[None, :]``; the column norms
  need every row, so a first pass over the row chunks accumulates their squares (float64), then
  the merge pass scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .lora import Columns, Rows, check_factors

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors


class RowDora(Rows):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor) -> None:
        super().__init__(a, b, scale)
        self.magnitude = magnitude  # (out,)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        import torch

        super().apply(work, row0, rows)
        norms = torch.linalg.vector_norm(work, dim=1)  # (rows,): blocks hold whole rows
        work.mul_((self.magnitude[row0 : row0 + rows] / norms).unsqueeze(1))


class ColumnDora(Columns):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor) -> None:
        super().__init__(a, b, scale)
        self.magnitude = magnitude  # (cols,)
        self.sumsq: torch.Tensor | None = None
        self.column_scale: torch.Tensor | None = None  # m / ||column of V||, once the first pass is done

    def begin(self, cols: int, device: torch.device) -> None:
        import torch

        self.sumsq = torch.zeros(cols, dtype=torch.float64, device=device)

    def observe(self, work: torch.Tensor, row0: int) -> None:
        """First pass: ``work`` holds rows of V (float32, as merged)."""
        assert self.sumsq is not None
        self.sumsq += work.double().square().sum(dim=0)

    def end(self) -> None:
        assert self.sumsq is not None
        self.column_scale = (self.magnitude.double() / self.sumsq.sqrt()).float()

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        super().apply(work, row0, rows)
        if self.column_scale is not None:
            work.mul_(self.column_scale.view(1, -1))


@dataclass(frozen=True)
class Dora:
    transposed: bool = False
    block_buffers = 0

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        return check_factors(d, tensor, info)

    def factor_keys(self, d: Delta) -> list[str]:
        assert d.lora.magnitude_key is not None
        return [d.lora.a_key, d.lora.b_key, d.lora.magnitude_key]

    def held_floats(self, d: Delta) -> int:
        return 2 * d.adapter.tensors[d.lora.b_key].shape[0] if self.transposed else 0  # (float64 column sums)

    def load(self, d: Delta, factors: Factors) -> Rows:
        a, b, m = (factors.get(d.adapter, k) for k in self.factor_keys(d))
        return (ColumnDora if self.transposed else RowDora)(a, b, d.scale, m)


DORA, DORA_T = Dora(), Dora(transposed=True)
