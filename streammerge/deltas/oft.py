"""OFT: a block-diagonal rotation of the input side, as PEFT merges it: ``W' = W R^T`` (PEFT: ``(R @ W^T)^T``).

``oft_R.weight`` (blocks, b(b-1)/2) holds each block's upper triangle; Q = that skew-symmetric
matrix (Q - Q^T), optionally projected first (``coft``: Q scaled to norm eps / sqrt(blocks) where
larger), and each block's rotation is PEFT's:
- Cayley-Neumann with t terms (``use_cayley_neumann``, default 5): R = I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^(t-1)
  (t = 2: I + 2Q; t = 3: I + 2Q + 2Q^2 + Q^3, as PEFT's loop runs);
- exact Cayley otherwise: R = (I - Q)(I + Q)^-1.
``block_share``: one block for all ``in / b`` of them. The rotations are built once per tensor in
float64 and rounded to float32; a row chunk is rotated block by block of its columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .roles import ByRole

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors


def block_size(n_elements: int) -> int:
    """b with b(b-1)/2 = n_elements (0 when there is none)."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements else 0


def rotations(vec: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """(blocks, b, b) rotations from the saved upper triangles (float64 in, float64 out)."""
    import torch

    blocks, b = vec.shape[0], block_size(vec.shape[1])
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    q = torch.zeros(blocks, b, b, dtype=vec.dtype, device=vec.device)
    q[:, rows, cols] = vec
    q = q - q.transpose(1, 2)
    if config.get("coft"):  # constrained: each block's Q kept within eps / sqrt(blocks) of 0
        eps = float(config.get("eps", 6e-5)) / math.sqrt(blocks)
        norm = q.norm(dim=(1, 2), keepdim=True)
        q = torch.where(norm <= eps, q, eps * q / norm)
    eye = torch.eye(b, dtype=vec.dtype, device=vec.device).expand(blocks, b, b)
    if not config.get("use_cayley_neumann", True):
        return torch.linalg.solve(eye + q, eye - q, left=False)
    terms = int(config.get("num_cayley_neumann_terms", 5))
    r = eye.clone()
    if terms > 1:  # (PEFT's series, term for term: 2Q, 2Q^2, 2Q^3 ... and the last power once)
        r = r + 2 * q
        if terms > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q
    return r


class Rotate:
    def __init__(self, r: torch.Tensor) -> None:
        self.r = r  # (blocks, b, b) float32

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        import torch

        blocks, b = self.r.shape[0], self.r.shape[1]
        v = work.view(rows, -1, b)
        r = self.r if v.shape[1] == blocks else self.r.expand(v.shape[1], b, b)  # (block_share)
        work.copy_(torch.einsum("nrk,rck->nrc", v, r).reshape(rows, -1))  # each block: W[:, blk] @ R^T


@dataclass(frozen=True)
class Oft(ByRole):
    roles = ("R",)
    block_buffers = 1

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        shape = d.adapter.tensors[d.lora.key("R")].shape
        b = block_size(shape[1]) if len(shape) == 2 else 0
        blocks = info.shape[1] // b if b and shape[0] == 1 and d.adapter.config.get("block_share") else shape[0]
        if len(info.shape) != 2 or not b or blocks * b != info.shape[1]:
            return f"{d.lora.module}: oft_R {list(shape)} (blocks of {b}) does not rotate the columns of {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Rotate:
        vec = factors.get(d.adapter, d.lora.key("R"))
        return Rotate(rotations(vec.double(), d.adapter.config).float())


OFT = Oft()
