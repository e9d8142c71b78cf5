"""LoRA (and rsLoRA: only its scaling differs, decided when the adapter is read).

Per row chunk, with s = adapter weight * scaling and the float32 rows ``work`` of W:
- ``lora``:        W[rows] += s * B[rows] @ A                 # (rows, r) @ (r, in)
- ``lora_T``:      W[rows] += s * (B @ A).T[rows]             # (rows, r) @ (r, cols) = A[:, rows].T @ B.T
                   (Conv1D stored in x out; Embedding (num_embeddings, dim) with A (r, vocab), B (dim, r))
- ``lora_bias``:   bias += s * lora_B.bias                    # the bias viewed as one row
- ``lora_expert``: ``lora`` with one expert's slice of fused factors: A3 = A.reshape(E, r, in),
                   B3 = B.reshape(out, r, E); expert e takes A[e*r:(e+1)*r] and B[:, e::E]
                   (rows ``d.rows`` of its output for the gate / up halves of gate_up_proj).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors


class Rows:
    """``W[rows] += s * B[rows] @ A``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.a, self.b, self.scale = a, b, scale  # A (r, in), B (out, r)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        work.addmm_(self.b[row0 : row0 + rows], self.a, alpha=self.scale)


class Columns(Rows):
    """``W[rows] += s * (B @ A).T[rows]``: A (r, W's rows), B (W's columns, r)."""

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        work.addmm_(self.a[:, row0 : row0 + rows].t(), self.b.t(), alpha=self.scale)


class BiasRow:
    """``bias += s * lora_B.bias``."""

    def __init__(self, b: torch.Tensor, scale: float) -> None:
        self.b, self.scale = b, scale

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        work.add_(self.b.view(1, -1), alpha=self.scale)


def select_expert(d: Delta, a: Any, b: Any) -> tuple[Any, Any]:
    """Expert ``d.expert``'s A (r, in) and B (out, r) out of the fused factors (rows ``d.rows`` of B)."""
    r, count = d.lora.r, d.lora.experts
    b = b[:, d.expert :: count]
    return a[d.expert * r : (d.expert + 1) * r], (b[d.rows[0] : d.rows[1]] if d.rows else b)


def check_factors(d: Delta, tensor: str, info: TensorInfo) -> str | None:
    """B @ A (or its transpose) must have the weight's shape."""
    a, b = d.adapter.tensors[d.lora.a_key].shape, d.adapter.tensors[d.lora.b_key].shape
    if len(info.shape) != 2:
        return f"{tensor} is {len(info.shape)}-D {list(info.shape)}, not a Linear, Conv1D or Embedding weight"
    expected = [a[1], b[0]] if d.transposed else [b[0], a[1]]
    if list(info.shape) != expected:
        what = "(lora_B @ lora_A).T" if d.transposed else "lora_B @ lora_A"
        return f"{d.lora.module}: {what} is {expected} but {tensor} is {list(info.shape)}"
    return None


@dataclass(frozen=True)
class Lora:
    transposed: bool = False
    block_buffers = 0

    def factor_keys(self, d: Delta) -> list[str]:
        return [d.lora.a_key, d.lora.b_key]

    def held_floats(self, d: Delta) -> int:
        return 0

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        return check_factors(d, tensor, info)

    def load(self, d: Delta, factors: Factors) -> Rows:
        a, b = factors.get(d.adapter, d.lora.a_key), factors.get(d.adapter, d.lora.b_key)
        return (Columns if self.transposed else Rows)(a, b, d.scale)


class LoraBias:
    block_buffers = 0

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        return None  # (the plan checks the bias against lora_B.bias when it finds the bias)

    def factor_keys(self, d: Delta) -> list[str]:
        assert d.lora.bias_key is not None
        return [d.lora.bias_key]

    def held_floats(self, d: Delta) -> int:
        return 0

    def load(self, d: Delta, factors: Factors) -> BiasRow:
        return BiasRow(factors.get(d.adapter, self.factor_keys(d)[0]), d.scale)


class LoraExpert(Lora):
    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        return None  # (the plan checks each expert's slice against the fused tensor)

    def load(self, d: Delta, factors: Factors) -> Rows:
        a, b = select_expert(d, factors.shared(d.adapter, d.lora.a_key), factors.shared(d.adapter, d.lora.b_key))
        return Rows(factors.put(a), factors.put(b), d.scale)


LORA, LORA_T, LORA_BIAS, LORA_EXPERT = Lora(), Lora(transposed=True), LoraBias(), LoraExpert()
