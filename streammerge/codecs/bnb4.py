"""bitsandbytes 4-bit checkpoints (QLoRA bases, as transformers saves ``load_in_4bit`` models:
``quantization_config.quant_method: "bitsandbytes"``), nf4 and fp4, with or without double
quantization, read and dequantized to 16-bit.

Per weight ``X.weight``: the packed codes (stored as U8, or as the ``bnb_4bit_quant_storage`` dtype:
the bytes are read as uint8 either way), ``X.weight.absmax``, ``X.weight.quant_map`` (the 16 code
values, used as saved), ``X.weight.quant_state.bitsandbytes__nf4|fp4`` (JSON in a U8 tensor:
blocksize, shape, dtype, and with double quantization nested_blocksize and nested_offset) and,
with double quantization, ``X.weight.nested_absmax`` and ``X.weight.nested_quant_map``:

    codes   = the flattened tensor's nibbles, high nibble first (element 2i: byte i >> 4)
    absmax  = absmax                                   (or, double-quantized:
              nested_quant_map[absmax] * nested_absmax[b // nested_blocksize] + nested_offset)
    W.flat[f] = quant_map[codes[f]] * absmax[f // blocksize]

Blocks run over the FLATTENED tensor and may straddle rows: a row chunk finds its blocks by flat
index. Tensors without a quant_state (embeddings, lm_head, norms, ``llm_int8_skip_modules``) are as
stored. 8-bit (LLM.int8) checkpoints are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError, UnsupportedError
from ..formats.checkpoint import read_bytes
from ..plan.types import Quant, Source
from . import RowMajor, side_source

if TYPE_CHECKING:
    import torch

    from ..formats.checkpoint import BaseCheckpoint

STATE = ".quant_state.bitsandbytes__"
SIDE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
SLICE = 1 << 17  # decode in slices of this many elements: the code temporaries stay small on any device


class Bnb4Codec(RowMajor):
    dtype = "U8"
    itemsize = 1
    row_alignment = 1

    def __init__(self, quant_map: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> None:
        self.quant_map, self.absmax, self.blocksize = quant_map, absmax, blocksize  # (16,), (blocks,) float32

    def nbytes(self, elements: int) -> int:
        return elements // 2  # whole rows of an even width: two codes a byte

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return raw.view(rows, cols // 2)

    def decode(self, stored: torch.Tensor, work: torch.Tensor, row0: int) -> None:
        rows, cols = work.shape
        step = max(1, SLICE // cols)
        for r in range(0, rows, step):
            packed = stored[r : r + step]
            pairs = work[r : r + step].view(packed.shape[0], cols // 2, 2)
            pairs[:, :, 0].copy_(self.quant_map[(packed >> 4).long()])  # high nibble: the even element
            pairs[:, :, 1].copy_(self.quant_map[(packed & 15).long()])
        self._scale(work.view(-1), row0 * cols)

    def _scale(self, flat: Any, start: int) -> None:
        """``flat`` holds elements ``[start, start + len)`` of the flattened tensor: times their block's absmax."""
        bs, n = self.blocksize, flat.shape[0]
        head = min(n, (-start) % bs)  # the rest of a block begun in an earlier chunk
        first = start // bs
        if head:
            flat[:head].mul_(self.absmax[first])
            first += 1
        whole = (n - head) // bs
        if whole:
            flat[head : head + whole * bs].view(whole, bs).mul_(self.absmax[first : first + whole, None])
        if head + whole * bs < n:  # a block the next chunk finishes
            flat[head + whole * bs :].mul_(self.absmax[first + whole])

    def encode(self, work: torch.Tensor, out: torch.Tensor) -> None:
        raise UnsupportedError("writing bitsandbytes 4-bit is not supported; the output is 16-bit")


def absmax_of(side: dict[str, torch.Tensor], params: tuple[Any, ...]) -> torch.Tensor:
    """The blocks' absmax as float32: as saved, or undone from its double quantization."""
    import torch

    _, _, nested_blocksize, nested_offset = params[:4]
    absmax = side["absmax"]
    if "nested_absmax" not in side:
        return absmax.float()
    nested = torch.arange(absmax.shape[0], device=absmax.device) // nested_blocksize
    return (side["nested_quant_map"][absmax.long()] * side["nested_absmax"][nested] + nested_offset).float()


@dataclass(frozen=True)
class Bitsandbytes4:
    name: str = "bitsandbytes"

    def out_dtype(self, qconfig: dict[str, Any]) -> str | None:
        """The bnb compute dtype the model was trained with."""
        return DTYPES.get(str(qconfig.get("bnb_4bit_compute_dtype")))

    def quantized(self, base: BaseCheckpoint, qconfig: dict[str, Any]) -> dict[str, Quant]:
        if not (qconfig.get("load_in_4bit") or qconfig.get("_load_in_4bit")):
            raise UnsupportedError(f"base {base.root}: bitsandbytes 8-bit (LLM.int8) is not read by this version; "
                                   "4-bit (nf4, fp4) is")
        found: dict[str, Quant] = {}
        for state in [n for n in base.weight_map if STATE in n]:
            name = state.split(STATE)[0]
            meta = self._meta(base, state)
            shape = tuple(meta.get("shape") or ())
            if len(shape) != 2 or shape[1] % 2:
                raise UnsupportedError(f"base {base.root}: {name} is 4-bit of shape {list(shape)}; only 2-D weights "
                                       "of an even width are read by this version")
            side = {s: self._source(base, f"{name}.{s}") for s in SIDE if f"{name}.{s}" in base.weight_map}
            if {"absmax", "quant_map"} - set(side):
                raise InputError(f"base {base.root}: {name} is 4-bit but has no absmax or quant_map; incomplete")
            params = (meta.get("quant_type"), int(meta["blocksize"]), int(meta.get("nested_blocksize") or 0),
                      float(meta.get("nested_offset") or 0.0))
            found[name] = Quant(self.name, side, params, (state,), shape, layout="bnb4")
        return found

    def _source(self, base: BaseCheckpoint, name: str) -> Source:
        return side_source(base, name, "bitsandbytes 4-bit")

    def _meta(self, base: BaseCheckpoint, state: str) -> dict[str, Any]:
        src = self._source(base, state)
        try:
            meta = json.loads(bytes(read_bytes(src.path, src.data_start + src.info.begin, src.info.nbytes)))
        except ValueError as exc:
            raise InputError(f"base {base.root}: {state} is not the JSON bitsandbytes writes ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("blocksize"), int):
            raise InputError(f"base {base.root}: {state} lacks a blocksize")
        return meta

    def codec(self, quant: Quant, side: dict[str, torch.Tensor]) -> Bnb4Codec:
        return Bnb4Codec(side["quant_map"].float(), absmax_of(side, quant.params), quant.params[1])


SCHEME = Bitsandbytes4()
