"""MiSS (PEFT's ``miss_block``), as PEFT merges it, s = the adapter's weight:
- default (B (r, out)): W[o, c] += s * B[c % r, o]   (PEFT: each r-column block of W plus B^T)
- ``mini`` (B (r, mini_r)): the same with B repeated along the outputs: B[c % r, o % mini_r]
- ``bat`` (B (out/r, r, r)): each r x r block of W, (i, j), gains W_ij @ B_i + B_i, so that row o
  (in row block i = o // r) gains, in every column block j, W[o, j] @ B_i + B_i[o % r]; the delta
  depends on W itself (as it stands when this delta's turn comes), row by row.
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


class Tiled:
    def __init__(self, b: torch.Tensor, scale: float, *, mini: bool) -> None:
        self.b, self.scale, self.mini = b, scale, mini  # (r, out) or (r, mini_r)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        import torch

        r = self.b.shape[0]
        outputs = torch.arange(row0, row0 + rows, device=work.device)
        columns = torch.arange(work.shape[1], device=work.device) % r
        b = self.b[:, outputs % self.b.shape[1] if self.mini else outputs]  # (r, rows)
        work.add_(b[columns].t(), alpha=self.scale)  # (rows, in): B[c % r, o]


class Blockwise:
    def __init__(self, b: torch.Tensor, scale: float) -> None:
        self.b, self.scale = b, scale  # (out/r, r, r)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        import torch

        r = self.b.shape[1]
        block = self.b[torch.arange(row0, row0 + rows, device=work.device) // r]  # (rows, r, r): each row's B_i
        v = work.view(rows, -1, r)  # (rows, in/r, r)
        delta = torch.einsum("nkc,ncd->nkd", v, block) + block[torch.arange(rows), torch.arange(row0, row0 + rows) % r][:, None, :]
        v.add_(delta, alpha=self.scale)


@dataclass(frozen=True)
class Miss(ByRole):
    roles = ("B",)
    block_buffers = 2  # (the per-row blocks of bat, and its delta)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        shape, fn = d.adapter.tensors[d.lora.key("B")].shape, d.adapter.config.get("init_weights")
        out, cols = info.shape if len(info.shape) == 2 else (0, 0)
        fits = (len(shape) == 3 and shape[0] * shape[1] == out and shape[1] == shape[2] and cols % shape[1] == 0
                if fn == "bat" else len(shape) == 2 and (shape[1] == out if fn != "mini" else out % shape[1] == 0))
        if not out or not fits:
            return f"{d.lora.module}: MiSS ({fn}) miss_block {list(shape)} does not fit {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Tiled | Blockwise:
        b = factors.get(d.adapter, d.lora.key("B"))
        fn = d.adapter.config.get("init_weights")
        return Blockwise(b, d.scale) if fn == "bat" else Tiled(b, d.scale, mini=fn == "mini")


MISS = Miss()
