"""compressed-tensors FP8 checkpoints (llm-compressor: ``quantization_config.quant_method:
"compressed-tensors"``, format ``float-quantized`` or ``naive-quantized``), read and dequantized.

``X.weight`` is F8_E4M3 (N, K) with ``X.weight_scale``, NOT inverted: ``W = q * scale`` (the
scheme is symmetric, no zero point), the scale's shape telling the strategy:
- tensor: one value (``[1]``);
- channel: ``[N, 1]``;
- block: ``[ceil(N/bn), ceil(K/bk)]`` for a group's ``block_structure`` [bn, bk] (partial edge blocks);
- group: ``[N, ceil(K/g)]`` for a group's ``group_size`` g.
Each is a scale per block of (bn, bk) = (N, K), (1, K), (bn, bk), (1, g): the block FP8 codec reads
them all. ``X.input_scale`` (static activation scales) is dropped from a 16-bit output. Other
formats (``pack-quantized`` int4, nvfp4, mxfp4 ...) and int8 weights are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError, UnsupportedError
from ..plan.types import Quant, Source
from .fp8_block import BlockFP8Codec

if TYPE_CHECKING:
    import torch

    from ..formats.checkpoint import BaseCheckpoint

READ_FORMATS = ("float-quantized", "naive-quantized")


def _block(shape: tuple[int, ...], grid: tuple[int, ...], groups: list[dict[str, Any]]) -> tuple[int, int] | None:
    """The (bn, bk) a scale of shape ``grid`` stands for on a weight of ``shape``."""
    n, k = shape
    if math.prod(grid) == 1:
        return n, k
    if grid == (n, 1):
        return 1, k
    for weights in groups:
        bn_bk, g = weights.get("block_structure"), weights.get("group_size")
        if isinstance(bn_bk, list) and len(bn_bk) == 2 and grid == (math.ceil(n / bn_bk[0]), math.ceil(k / bn_bk[1])):
            return int(bn_bk[0]), int(bn_bk[1])
        if isinstance(g, int) and g > 0 and grid == (n, math.ceil(k / g)):
            return 1, g
    return None


@dataclass(frozen=True)
class CompressedTensors:
    name: str = "compressed-tensors"

    def out_dtype(self, qconfig: dict[str, Any]) -> str | None:
        return None

    def _groups(self, base: BaseCheckpoint, qconfig: dict[str, Any]) -> list[dict[str, Any]]:
        groups = qconfig.get("config_groups") or {}
        formats = {g.get("format") or qconfig.get("format") for g in groups.values() if isinstance(g, dict)}
        formats.discard(None)
        odd = sorted(str(f) for f in formats if f not in READ_FORMATS) or (
            [str(qconfig.get("format"))] if qconfig.get("format") not in (None, *READ_FORMATS) else [])
        if odd:
            raise UnsupportedError(f"base {base.root}: compressed-tensors format {', '.join(odd)} is not read by this "
                                   f"version ({' and '.join(READ_FORMATS)} FP8 are)")
        weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
        for w in weights:
            if w and (w.get("type") != "float" or w.get("num_bits") != 8):
                raise UnsupportedError(f"base {base.root}: compressed-tensors {w.get('type')} {w.get('num_bits')}-bit "
                                       "weights are not read by this version (8-bit float weights are)")
        return weights

    def quantized(self, base: BaseCheckpoint, qconfig: dict[str, Any]) -> dict[str, Quant]:
        groups = self._groups(base, qconfig)
        found: dict[str, Quant] = {}
        for name in base.weight_map:
            info = base.info(name)
            scale_name = name + "_scale"
            if info.dtype != "F8_E4M3" or scale_name not in base.weight_map:
                continue
            if name.removesuffix("weight") + "weight_zero_point" in base.weight_map:
                raise UnsupportedError(f"base {base.root}: {name} has a zero point (asymmetric FP8), not read by this "
                                       "version")
            scale = base.info(scale_name)
            block = _block(info.shape, tuple(d for d in scale.shape) or (1,), groups) if len(info.shape) == 2 else None
            if block is None or scale.dtype not in ("F32", "BF16", "F16"):
                raise InputError(f"base {base.root}: {scale_name} {scale.dtype}{list(scale.shape)} fits no strategy "
                                 f"(tensor, channel, block, group) of {name} {list(info.shape)}")
            header = base.shards[base.weight_map[scale_name]]
            if header.data_start < 0:
                raise UnsupportedError(f"base {base.root}: compressed-tensors from the Hub shard by shard is not "
                                       "supported by this version; download the repository first")
            input_scale = name.removesuffix("weight") + "input_scale"
            found[name] = Quant(self.name, {"scale": Source(header.path, header.data_start, scale)}, block,
                                (input_scale,) if input_scale in base.weight_map else ())
        return found

    def codec(self, quant: Quant, side: dict[str, torch.Tensor]) -> BlockFP8Codec:
        bn, bk = quant.params
        scale = side["scale"].float()
        return BlockFP8Codec(scale.reshape(-1, scale.shape[-1] if scale.dim() > 1 else 1), (int(bn), int(bk)))


SCHEME = CompressedTensors()
