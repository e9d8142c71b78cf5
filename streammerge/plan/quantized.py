"""What a quantized base's weights become in the plan: dequantized to 16-bit (the default: side
tensors dropped, packed weights back under their own names) or, with ``--dtype fp8`` on an FP8
base, written back in its own scheme (untouched weights and scales copied, merged ones
re-quantized with their scale tensors). Headers only; the codecs do the arithmetic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..codecs import Scheme, check_scheme, quantization
from ..errors import PlanError, UnsupportedError
from ..formats.checkpoint import BaseCheckpoint
from ..formats.header import TensorInfo
from .types import MergePlan, Quant, Requant


@dataclass(frozen=True)
class QuantizedBase:
    base: BaseCheckpoint
    scheme: Scheme | None
    weights: dict[str, Quant]  # output weight name -> how it is stored
    keep: bool  # --dtype fp8: written back in the base's scheme
    dequant_to: str  # what dequantized weights become

    @classmethod
    def of(cls, base: BaseCheckpoint, target: str | None, *, keep: bool) -> QuantizedBase:
        scheme = check_scheme(base.config, str(base.origin or base.root))
        qconfig = quantization(base.config) or {}
        weights = scheme.quantized(base, qconfig) if scheme else {}
        default = scheme.out_dtype(qconfig) if scheme else None
        return cls(base, scheme, weights, keep, target or default or _unquantized_dtype(base, weights))

    def register(self, names: dict[str, str], infos: dict[str, TensorInfo]) -> None:
        """Each packed weight's header under its own name with its real shape (GPTQ's ``qweight`` is
        ``weight`` (N, K) to the adapter lookup and the output)."""
        for n, q in self.weights.items():
            stored = self.base.info(q.stored or n)
            infos[n] = dataclasses.replace(stored, name=n, shape=q.shape or stored.shape)
            names[n] = self.base.weight_map[q.stored or n]

    @property
    def dropped(self) -> set[str]:
        """Base tensors a dequantized output leaves out: side tensors, and stored names replaced."""
        if self.keep:
            return set()
        side = {n for q in self.weights.values() for n in (*(s.info.name for s in q.side.values()), *q.dropped)}
        return side | {q.stored for q in self.weights.values() if q.stored}

    def out_dtype(self, info: TensorInfo) -> str:
        return info.dtype if self.keep else self.dequant_to

    @property
    def dequantized(self) -> str | None:
        return self.scheme.name if self.weights and self.scheme and not self.keep else None

    def finish(self, plan: MergePlan) -> None:
        if self.keep:
            _write_back(plan, self.scheme.name if self.scheme else None, self.weights)


def _unquantized_dtype(base: BaseCheckpoint, quant: dict[str, Quant]) -> str:
    """What dequantized weights become with --dtype auto: the dtype of the base's unquantized float
    tensors (the most common one; bf16 if there are none)."""
    side = {s.info.name for q in quant.values() for s in q.side.values()}
    counts: dict[str, int] = {}
    for name in base.weight_map:
        info = base.info(name)
        if name not in quant and name not in side and info.dtype in ("BF16", "F16"):
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=lambda d: counts[d]) if counts else "BF16"


def _write_back(plan: MergePlan, scheme: str | None, quant: dict[str, Quant]) -> None:
    """--dtype fp8: untouched FP8 weights and their scales are copied; each merged one is re-quantized
    (``codecs.fp8_out``) and writes its scale tensor, moved beside it when the base keeps it in
    another shard (the index says where: loaders follow it)."""
    if not quant or any(q.layout != "fp8" for q in quant.values()):
        kind = f"quantized with {scheme} (not FP8)" if quant else "not quantized"
        raise PlanError(f"--dtype fp8 writes an FP8 base back in its own scheme, but base {plan.base.root} is {kind}; "
                        "choose --dtype bf16, fp16 or fp32")
    by_name = {t.name: t for t in plan.tensors()}
    for t in plan.tensors():
        t.keep_codes = t.quant is not None
    for t in [t for t in plan.touched if t.quant is not None]:
        assert t.quant is not None
        if t.source is not None or t.tokens is not None or any(d.lora.magnitude_key for d in t.deltas):
            raise UnsupportedError(f"{t.name}: --dtype fp8 re-quantizes LoRA deltas; a DoRA adapter, replaced "
                                   "weight or token rows on an FP8 weight need a 16-bit --dtype (bf16)")
        scale = by_name[t.quant.side["scale"].info.name]
        bn, bk = t.quant.params
        t.requant = Requant(scale.name, scale.info.dtype, (int(bn), int(bk)))
        scale.written_by = t.name
        if scale.shard != t.shard:
            plan.shards[scale.shard].remove(scale)
            scale.shard = t.shard
            plan.shards[t.shard].append(scale)
    plan.requantized = scheme
