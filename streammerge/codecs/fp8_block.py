"""Block FP8 (DeepSeek-V3/R1, Qwen3-FP8: ``quantization_config.quant_method: "fp8"`` with
``weight_block_size: [bn, bk]``), read and dequantized to 16-bit.

``X.weight`` is F8_E4M3 (N, K) with ``X.weight_scale_inv`` [ceil(N/bn), ceil(K/bk)] (float32 or
bf16, possibly in another shard), multiplied when dequantizing (despite the name):

    W[i, j] = q[i, j] * s[i // bn, j // bk]

Dimensions that are not multiples of the block have partial edge blocks, which reuse the edge
scale (the grid is rounded up; the block size comes from the config, never inferred from the grid).
Each row's scales are gathered by its own index, so any row range is a valid chunk. Weights without
a scale (``modules_to_not_convert``, ``ignored_layers``: embeddings, norms, lm_head) stay as they are.

Plan side (headers only, no torch at import): ``Fp8Block.quantized``; merge side: ``codec``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError, UnsupportedError
from ..plan.types import Quant
from . import RowMajor, side_source

if TYPE_CHECKING:
    import torch

    from ..formats.checkpoint import BaseCheckpoint

SCALE_SUFFIX = "_scale_inv"


class BlockFP8Codec(RowMajor):
    """Decodes F8_E4M3 rows with their block scales (float32 ``scale`` on the merge device)."""

    dtype = "F8_E4M3"
    itemsize = 1
    row_alignment = 1

    def __init__(self, scale: torch.Tensor, block: tuple[int, int]) -> None:
        self.scale, self.block_size = scale, block

    def nbytes(self, elements: int) -> int:
        return elements

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        import torch

        return raw.view(torch.float8_e4m3fn).view(rows, cols)

    def decode(self, stored: torch.Tensor, work: torch.Tensor, row0: int) -> None:
        work.copy_(stored)  # e4m3 -> float32 is exact
        rows, cols = work.shape
        bn, bk = self.block_size
        first = row0 // bn
        grid = self.scale[first : (row0 + rows - 1) // bn + 1]  # the block rows these rows touch
        per_row = grid.repeat_interleave(bn, dim=0)[row0 - first * bn : row0 - first * bn + rows]  # (rows, K/bk)
        full = cols // bk
        if full:  # whole column blocks, one multiply: (rows, full, bk) * (rows, full, 1)
            work[:, : full * bk].unflatten(1, (full, bk)).mul_(per_row[:, :full, None])
        if cols % bk:  # the partial edge block reuses the edge scale
            work[:, full * bk :].mul_(per_row[:, full : full + 1])

    def encode(self, work: torch.Tensor, out: torch.Tensor) -> None:
        raise UnsupportedError("writing block FP8 is not supported by this version; choose a 16-bit --dtype")


@dataclass(frozen=True)
class Fp8Block:
    name: str = "fp8"

    def out_dtype(self, qconfig: dict[str, Any]) -> str | None:
        return None

    def quantized(self, base: BaseCheckpoint, qconfig: dict[str, Any]) -> dict[str, Quant]:
        """Every F8_E4M3 weight with its ``_scale_inv``, its scale grid checked against the block size."""
        block = qconfig.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise UnsupportedError(f"base {base.root}: quant_method 'fp8' without weight_block_size [bn, bk] (per-tensor "
                                   "or per-channel FP8) is not read by this version; block FP8 is")
        found: dict[str, Quant] = {}
        for name, shard in base.weight_map.items():
            info = base.info(name)
            if info.dtype != "F8_E4M3":
                continue
            scale_name = name + SCALE_SUFFIX
            if scale_name not in base.weight_map:
                raise InputError(f"base {base.root}: {name} is F8_E4M3 but has no {scale_name}; the checkpoint is "
                                 "incomplete")
            scale = base.info(scale_name)
            if scale.dtype == "F8_E8M0":
                raise UnsupportedError(f"base {base.root}: {scale_name} holds E8M0 (power-of-two, MX-format) scales, "
                                       "not read by this version (float32, bf16 or f16 block scales are)")
            want = [math.ceil(d / b) for d, b in zip(info.shape, block)]
            if len(info.shape) != 2 or list(scale.shape) != want or scale.dtype not in ("F32", "BF16", "F16"):
                raise InputError(f"base {base.root}: {scale_name} is {scale.dtype}{list(scale.shape)} but {name} "
                                 f"{list(info.shape)} in blocks of {block} needs a float {want} grid")
            found[name] = Quant(self.name, {"scale": side_source(base, scale_name, "block FP8")}, tuple(block),
                                layout="fp8")
        return found

    def codec(self, quant: Quant, side: dict[str, torch.Tensor]) -> BlockFP8Codec:
        bn, bk = quant.params
        return BlockFP8Codec(side["scale"].float(), (int(bn), int(bk)))


SCHEME = Fp8Block()
