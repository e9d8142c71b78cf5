"""RoAd: 2-D rotations (with scales) of pairs of OUTPUT rows, as PEFT applies them (``_apply_road``),
so ``W' = R W`` with, in each group of g rows (halves of h = g/2), row i of the first half paired
with row i + h:

    W'[i]     = c[i] W[i]     - s[i] W[i + h]
    W'[i + h] = c[i + h] W[i + h] + s[i + h] W[i]

c = alpha * cos(theta), s = alpha * sin(theta) per row (``road_1``: g/2 values per group, shared by
both halves; ``road_2``: one per row; ``road_4``: separate angles and scales for c and s). A chunk
must hold whole groups (the module's ``row_group``, which the chunks are aligned to).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .roles import ByRole

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors

PARAMETERS = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # variant -> saved values per output row


def columns(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row c and s of one variant (float64 in and out)."""
    if variant == "road_1":
        theta = theta.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
    if variant in ("road_1", "road_2"):
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)  # road_4
    return alpha[:, 0].flatten() * theta[:, 0].cos().flatten(), alpha[:, 1].flatten() * theta[:, 1].sin().flatten()


class Pairs:
    def __init__(self, c: torch.Tensor, s: torch.Tensor, g: int) -> None:
        self.c, self.s, self.g = c, s, g  # (out,) float32

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        h = self.g // 2
        v = work.view(rows // self.g, 2, h, -1)  # (groups, half, row in half, columns)
        c = self.c[row0 : row0 + rows].view(-1, 2, h, 1)
        s = self.s[row0 : row0 + rows].view(-1, 2, h, 1)
        first, second = v[:, 0].clone(), v[:, 1]
        v[:, 0].mul_(c[:, 0]).addcmul_(second, s[:, 0], value=-1.0)
        v[:, 1].mul_(c[:, 1]).addcmul_(first, s[:, 1])


@dataclass(frozen=True)
class Road(ByRole):
    roles = ("theta", "alpha")
    block_buffers = 1  # (the first half of a block, kept while the second is rotated)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        config: dict[str, Any] = d.adapter.config
        g, per_row = d.lora.row_group, PARAMETERS.get(str(config.get("variant")), 0)
        theta, alpha = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        if (len(info.shape) != 2 or g < 2 or g % 2 or info.shape[0] % g or theta != alpha
                or theta != (int(info.shape[0] * per_row),)):
            return (f"{d.lora.module}: RoAd {config.get('variant')} road_theta {list(theta)} in groups of {g} does not "
                    f"rotate the rows of {tensor} {list(info.shape)}")
        return None

    def load(self, d: Delta, factors: Factors) -> Pairs:
        theta, alpha = (factors.get(d.adapter, k).double() for k in self.factor_keys(d))
        c, s = columns(str(d.adapter.config["variant"]), d.lora.row_group, theta, alpha)
        return Pairs(c.float(), s.float(), d.lora.row_group)


ROAD = Road()
