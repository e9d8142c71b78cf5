"""Trainable tokens (PEFT ``trainable_token_indices``): rows ``ids`` of the weight replaced by the
adapter's saved values, applied after every other delta."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..plan.types import TokenRows
    from . import Factors


class Tokens:
    def __init__(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        self.ids, self.values = ids, values  # (k,), (k, cols)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        inside = (self.ids >= row0) & (self.ids < row0 + rows)
        work[self.ids[inside] - row0] = self.values[inside]


def load_tokens(tokens: TokenRows, factors: Factors) -> Tokens:
    import torch

    ids = factors.put(torch.tensor(tokens.ids, dtype=torch.long))
    return Tokens(ids, factors.get(tokens.adapter, tokens.key))
