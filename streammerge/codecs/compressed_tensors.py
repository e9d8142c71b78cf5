"""compressed-tensors checkpoints (llm-compressor: ``quantization_config.quant_method:
"compressed-tensors"``), read and dequantized.

FP8, formats ``float-quantized`` / ``naive-quantized``: ``X.weight`` is F8_E4M3 (N, K) with
``X.weight_scale``, NOT inverted: ``W = q * scale`` (symmetric, no zero point), the scale's shape
telling the strategy:
- tensor: one value (``[1]``);
- channel: ``[N, 1]``;
- block: ``[ceil(N/bn), ceil(K/bk)]`` for a group's ``block_structure`` [bn, bk] (partial edge blocks);
- group: ``[N, ceil(K/g)]`` for a group's ``group_size`` g.
Each is a scale per block of (bn, bk) = (N, K), (1, K), (bn, bk), (1, g): the block FP8 codec reads
them all. ``X.input_scale`` (static activation scales) is dropped from a 16-bit output.

Integers, format ``pack-quantized`` (W4A16, W8A16): ``X.weight_packed`` int32 (N, K*bits/32),
codes offset by 2^(bits-1), ``X.weight_scale`` (N, G) per group (G = 1: per channel),
``X.weight_zero_point`` (asymmetric: int32 (N*bits/32, G), packed down the rows),
``X.weight_shape`` (N, K) and, with act-order, ``X.weight_g_idx``: the integer group codec
(``intgroup``) reads them. Other formats (nvfp4, mxfp4, marlin-24 ...) and int8 ``naive-quantized``
weights are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError, UnsupportedError
from ..formats.checkpoint import read_bytes
from ..plan.types import Quant
from . import Codec, side_source
from .fp8_block import BlockFP8Codec

if TYPE_CHECKING:
    import torch

    from ..formats.checkpoint import BaseCheckpoint

READ_FORMATS = ("float-quantized", "naive-quantized", "pack-quantized")


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


def _int_group_size(k: int, groups_in_row: int, groups: list[dict[str, Any]]) -> int | None:
    """The group size a scale of ``groups_in_row`` columns stands for on rows of ``k`` (k: one group)."""
    if groups_in_row == 1:
        return k
    sizes = [w["group_size"] for w in groups if isinstance(w.get("group_size"), int) and w["group_size"] > 0]
    return next((g for g in sizes if math.ceil(k / g) == groups_in_row), None)


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
                                   f"version ({', '.join(READ_FORMATS)} are)")
        weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
        for w in weights:
            if w and (w.get("type"), w.get("num_bits")) not in (("float", 8), ("int", 4), ("int", 8)):
                raise UnsupportedError(f"base {base.root}: compressed-tensors {w.get('type')} {w.get('num_bits')}-bit "
                                       "weights are not read by this version (8-bit float and packed 4- or 8-bit "
                                       "int weights are)")
        return weights

    def quantized(self, base: BaseCheckpoint, qconfig: dict[str, Any]) -> dict[str, Quant]:
        groups = self._groups(base, qconfig)
        found: dict[str, Quant] = {}
        for name in base.weight_map:
            info = base.info(name)
            if name.endswith(".weight_packed"):
                found[name.removesuffix("_packed")] = self._packed(base, name, groups)
            elif info.dtype == "I8" and name + "_scale" in base.weight_map:
                raise UnsupportedError(f"base {base.root}: {name} is int8 (naive-quantized), not read by this version")
            elif info.dtype == "F8_E4M3" and name + "_scale" in base.weight_map:
                found[name] = self._fp8(base, name, groups)
        return found

    def _fp8(self, base: BaseCheckpoint, name: str, groups: list[dict[str, Any]]) -> Quant:
        info, scale_name = base.info(name), name + "_scale"
        if name.removesuffix("weight") + "weight_zero_point" in base.weight_map:
            raise UnsupportedError(f"base {base.root}: {name} has a zero point (asymmetric FP8), not read by this "
                                   "version")
        scale = base.info(scale_name)
        block = _block(info.shape, tuple(d for d in scale.shape) or (1,), groups) if len(info.shape) == 2 else None
        if block is None or scale.dtype not in ("F32", "BF16", "F16"):
            raise InputError(f"base {base.root}: {scale_name} {scale.dtype}{list(scale.shape)} fits no strategy "
                             f"(tensor, channel, block, group) of {name} {list(info.shape)}")
        input_scale = name.removesuffix("weight") + "input_scale"
        return Quant(self.name, {"scale": side_source(base, scale_name, "compressed-tensors")}, block,
                     (input_scale,) if input_scale in base.weight_map else (), layout="fp8")

    def _packed(self, base: BaseCheckpoint, packed: str, groups: list[dict[str, Any]]) -> Quant:
        """A ``pack-quantized`` weight: its codes, shape, scales, zero points and act-order groups."""
        module = packed.removesuffix(".weight_packed")
        names = {k: f"{module}.weight_{k}" for k in ("scale", "zero_point", "g_idx", "shape")}
        if not {names["scale"], names["shape"]} <= set(base.weight_map):
            raise InputError(f"base {base.root}: {packed} has no weight_scale or weight_shape; the checkpoint is "
                             "incomplete")
        shape_src = side_source(base, names["shape"], "compressed-tensors")
        n, k = (int(v) for v in memoryview(read_bytes(shape_src.path, shape_src.data_start + shape_src.info.begin,
                                                        shape_src.info.nbytes)).cast("q"))
        words, scale = base.info(packed), base.info(names["scale"])
        bits = words.shape[1] * 32 // k if len(words.shape) == 2 and k else 0
        size = _int_group_size(k, scale.shape[-1], groups) if len(scale.shape) == 2 else None
        if words.dtype != "I32" or bits not in (4, 8) or k * bits % 32 or tuple(words.shape) != (n, k * bits // 32):
            raise UnsupportedError(f"base {base.root}: {packed} {words.dtype}{list(words.shape)} is not 4- or 8-bit "
                                   f"codes of a [{n}, {k}] weight in whole int32 words, which this version reads")
        if size is None or tuple(scale.shape) != (n, math.ceil(k / size)):
            raise InputError(f"base {base.root}: {names['scale']} {list(scale.shape)} fits no group size of {module} "
                             f"[{n}, {k}]")
        side = {key: side_source(base, names[stored], "compressed-tensors")
                for key, stored in (("scale", "scale"), ("zero", "zero_point"), ("g_idx", "g_idx"))
                if names[stored] in base.weight_map}
        floats = n * scale.shape[1] * (2 if "zero" in side else 1) + (2 * k if "g_idx" in side else 0)
        return Quant(self.name, side, (bits, size), (names["shape"],), (n, k), "rows", packed, floats)

    def codec(self, quant: Quant, side: dict[str, torch.Tensor]) -> Codec:
        if quant.layout == "rows":
            from .intgroup import RowsCodec, Groups, unpack

            bits, size = quant.params
            n = side["scale"].shape[0]
            zero = (unpack(side["zero"].T.contiguous(), bits)[:, :n].T.float() if "zero" in side  # (packed down the rows)
                    else float(1 << (bits - 1)))
            g_idx = side["g_idx"].long() if "g_idx" in side else None
            return RowsCodec(bits, Groups(side["scale"].float(), zero, size, g_idx))
        bn, bk = quant.params
        scale = side["scale"].float()
        return BlockFP8Codec(scale.reshape(-1, scale.shape[-1] if scale.dim() > 1 else 1), (int(bn), int(bk)))


SCHEME = CompressedTensors()
