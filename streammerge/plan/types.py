"""What a plan is made of: deltas, sources, token rows, one entry per output tensor, the plan.

Pure data (no torch): built by ``plan.build_plan`` from headers, read by the engine, the manifest
and ``verify``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.types import LoraAdapter, LoraModule
from ..formats.checkpoint import BaseCheckpoint
from ..formats.header import DTYPE_SIZES, TensorInfo

DTYPE_CHOICES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
KEEP_FP8 = "fp8"  # --dtype fp8: an FP8 base written back in its own scheme
CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True, eq=False)
class Delta:
    """One adapter module's change to one base tensor. ``method`` names its implementation in the
    delta registry (``streammerge.deltas``): ``lora`` (``W + s B A``), ``lora_T`` (``W + s (B A)^T``:
    Conv1D, Embedding), ``lora_bias``, ``lora_expert`` (one expert's slice of fused factors, ``rows``
    of its output for the gate / up split), ``dora`` (rows rescaled), ``dora_T`` (columns rescaled)."""

    adapter: LoraAdapter
    lora: LoraModule
    rule: str
    method: str = "lora"
    expert: int = -1
    rows: tuple[int, int] | None = None
    shape: tuple[int, ...] = ()  # the tensor it changes (methods whose factors depend on the layer's size)
    companion: Source | None = None  # a bias delta's layer weight in the base (GLoRA's bias reads W0 @ C)

    @property
    def transposed(self) -> bool:
        """The weight holds (B @ A).T: Conv1D (stored in x out) or an Embedding."""
        return self.method.endswith("_T")

    @property
    def vector(self) -> bool:
        return self.method == "lora_bias"

    def select(self, a: Any, b: Any) -> tuple[Any, Any]:
        """This delta's A (r, in) and B (out, r) out of the adapter's full factors."""
        if self.expert < 0:
            return a, b
        r, count = self.lora.r, self.lora.experts
        b = b[:, self.expert :: count]
        return a[self.expert * r : (self.expert + 1) * r], (b[self.rows[0] : self.rows[1]] if self.rows else b)

    @property
    def scale(self) -> float:
        return self.adapter.weight * self.lora.scaling

    @property
    def factor_bytes(self) -> int:
        """float32 bytes of the factors this delta holds on the merge device (its method says which),
        and of what its method derives from them and holds."""
        from ..deltas import method

        m = method(self.method)
        return 4 * (sum(self.adapter.tensors[k].numel for k in m.factor_keys(self)) + m.held_floats(self))


@dataclass(frozen=True)
class Source:
    """Where a tensor's input bytes are: a base shard, or a file of an adapter that replaces it."""

    path: Path
    data_start: int
    info: TensorInfo


@dataclass(frozen=True)
class Quant:
    """A quantized base tensor: its scheme (``codecs.QUANT_METHODS``), where its side tensors are
    (scales ...) and the scheme's parameters (e.g. the block size)."""

    scheme: str
    side: dict[str, Source]
    params: tuple[Any, ...] = ()
    dropped: tuple[str, ...] = ()  # other tensors of the scheme not written out (e.g. input_scale)
    shape: tuple[int, ...] | None = None  # the weight's real shape when it is stored packed (4-bit)
    layout: str = ""  # how the codes are stored (verify reads each layout its own way)
    stored: str | None = None  # the stored tensor when its name is not the weight's (GPTQ's qweight)
    side_floats: int | None = None  # float32 values the codec builds from the side tensors (unpacked zeros)
    row_alignment: int = 1  # chunks start at multiples of this many rows

    @property
    def side_bytes(self) -> int:
        """float32 bytes of the side tensors on the merge device."""
        return 4 * (self.side_floats if self.side_floats is not None else sum(s.info.numel for s in self.side.values()))


@dataclass(frozen=True)
class Requant:
    """A merged FP8 weight written back as FP8 (``codecs.fp8_out``): its scale tensor, rewritten with
    it, and the base's scale block (bn, bk) (tensor: the whole shape; channel: (1, K))."""

    scale: str
    scale_dtype: str
    block: tuple[int, int]


@dataclass(frozen=True, eq=False)
class TokenRows:
    """Rows ``ids`` of a weight replaced by the adapter's saved values (PEFT trainable tokens)."""

    adapter: LoraAdapter
    ids: tuple[int, ...]
    key: str  # "<module>.token_adapter.trainable_tokens_delta", (len(ids), dim)


@dataclass
class TensorPlan:
    name: str
    shard: str
    info: TensorInfo  # the base tensor (its place in the base shard)
    out_dtype: str
    deltas: list[Delta] = field(default_factory=list)
    source: Source | None = None  # set when an adapter supplies the tensor's base weight
    tokens: TokenRows | None = None  # rows replaced last (trainable_token_indices)
    quant: Quant | None = None  # a quantized base weight: dequantized on reading
    requant: Requant | None = None  # written back in the base's scheme (--dtype fp8), with new scales
    written_by: str | None = None  # a scale tensor written by its weight's re-quantization
    keep_codes: bool = False  # a quantized weight written back in its scheme (copied unless merged)

    @property
    def dequantized(self) -> bool:
        """A quantized base weight decoded to a float output (even when its storage dtype is a float:
        bitsandbytes may store codes as bf16)."""
        return self.quant is not None and self.source is None and not self.keep_codes

    @property
    def rewritten(self) -> bool:
        """True when the bytes change (merged, converted, replaced or dequantized); False: copied byte for byte."""
        return (bool(self.deltas) or self.out_dtype != self.info.dtype or self.source is not None
                or self.tokens is not None or self.written_by is not None or self.dequantized)

    @property
    def merged(self) -> bool:
        """Row-wise work beyond a copy or conversion: LoRA deltas or token rows."""
        return bool(self.deltas) or self.tokens is not None

    @property
    def origin_dtype(self) -> str:
        """The stored dtype of the tensor's input bytes (the adapter's, when it replaces the weight)."""
        return self.source.info.dtype if self.source is not None else self.info.dtype

    def origin(self, base: BaseCheckpoint) -> Source:
        if self.source is not None:
            return self.source
        header = base.shards[self.shard]
        return Source(header.path, header.data_start, self.info)

    @property
    def row_alignment(self) -> int:
        """Chunks start at multiples of this many rows: the codes' (a word of AWQ holds 8 rows), the
        new scale blocks' (a re-quantized block of bn rows is encoded at once) and the deltas' (RoAd's
        groups of paired rows)."""
        read = self.quant.row_alignment if self.quant is not None and self.source is None else 1
        bn = self.requant.block[0] if self.requant is not None and self.requant.block[0] < self.info.shape[0] else 1
        return math.lcm(read, bn, *(d.lora.row_group for d in self.deltas))

    @property
    def rows_cols(self) -> tuple[int, int]:
        """The 2-D view the merge walks in row chunks: (out, in) for weights, (numel, 1) otherwise;
        a merged bias is one row."""
        if self.merged and len(self.info.shape) == 1:
            return 1, self.info.shape[0]
        if self.merged or self.quant is not None:  # (a quantized weight's scales go by row and column)
            return self.info.shape[0], self.info.shape[1]
        return self.info.numel, 1


@dataclass
class MergePlan:
    base: BaseCheckpoint
    adapters: list[LoraAdapter]
    shards: dict[str, list[TensorPlan]]  # output shard name -> tensors in the base's data order
    out_dtype: str | None  # None: each tensor keeps its dtype
    config_changes: dict[str, Any] = field(default_factory=dict)  # keys to set in config.json
    tokenizer_from: Path | None = None  # where the tokenizer files come from (None: the base's)
    tokenizer_why: str | None = None
    excluded: list[str] = field(default_factory=list)  # what --include / --exclude left out
    dropped: set[str] = field(default_factory=set)  # base tensors not written (scales of a dequantized scheme)
    dequantized: str | None = None  # the quantization scheme read and written out as out_dtype / config_dtype
    config_dtype: str | None = None  # the dtype config.json gets (the output dtype, or that of dequantized weights)
    requantized: str | None = None  # the quantization scheme written back (--dtype fp8): config kept as it is
    notes: list[str] = field(default_factory=list)  # what the plan decided that the user should know

    @property
    def weight_map(self) -> dict[str, str]:
        """The output's tensor -> shard map: the base's (less the side tensors of a dequantized
        scheme), plus any tensor the merge adds."""
        return {**{n: s for n, s in self.base.weight_map.items() if n not in self.dropped},
                **{t.name: t.shard for t in self.tensors()}}

    def tensors(self) -> Iterator[TensorPlan]:
        for tensors in self.shards.values():
            yield from tensors

    @property
    def touched(self) -> list[TensorPlan]:
        return [t for t in self.tensors() if t.merged]

    def shard_bytes(self, shard: str) -> int:
        """Data bytes of one output shard."""
        return sum(t.info.numel * DTYPE_SIZES[t.out_dtype] for t in self.shards[shard])

    @property
    def output_size(self) -> int:
        return sum(t.info.numel * DTYPE_SIZES[t.out_dtype] for t in self.tensors())

    @property
    def max_factor_bytes(self) -> int:
        """Largest float32 factor set one tensor needs; doubled for fused experts, whose two
        parameters' factors stay cached while their per-expert tensors alternate."""
        single = self._max_factor_bytes
        return 2 * single if any(d.expert >= 0 for t in self.touched for d in t.deltas) else single

    @property
    def _max_factor_bytes(self) -> int:
        return max((sum(d.factor_bytes for d in t.deltas) + (t.tokens.adapter.tensors[t.tokens.key].numel * 12
                    if t.tokens else 0) + (t.quant.side_bytes if t.quant else 0)
                    for t in self.tensors() if t.rewritten), default=0)
