"""One tensor of an open shard rewritten chunk by chunk: read raw rows, decode to float32, apply
the deltas, encode (rounded once), hand the bytes to the output's I/O thread.

Memory: the chunk buffers are the compute's (``compute.py``); adapter factors are loaded per
tensor (fused-expert factors stay cached while their per-expert tensors alternate).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..codecs import Requantizer, codec_for, scheme
from ..deltas import FirstPass, load
from ..deltas.tokens import load_tokens
from ..formats.checkpoint import pread_into
from ..plan.types import Source, TensorPlan
from .compute import Compute
from .task import Target, tensor_kind

if TYPE_CHECKING:
    import torch

    from ..adapters.types import LoraAdapter
    from ..codecs import Codec
    from ..deltas import Applied
    from .processor import Processor, Slot

EXPERT_CACHE = 4  # A and B of gate_up and of down


class TensorMerger:
    """Rewrites tensors with the compute's buffers; the delta registry's ``Factors`` source."""

    def __init__(self, compute: Compute) -> None:
        self.compute = compute
        self._cache: dict[tuple[int, str], torch.Tensor] = {}  # fused-expert factors
        self._source_fds: dict[Path, int] = {}  # adapter files that supply base weights

    # Factors (see streammerge.deltas)
    def get(self, adapter: LoraAdapter, key: str) -> torch.Tensor:
        return self.put(adapter.load(key))

    def shared(self, adapter: LoraAdapter, key: str) -> torch.Tensor:
        """The last EXPERT_CACHE tensors read stay (gate_up and down alternate)."""
        entry = (id(adapter), key)
        if entry not in self._cache:
            while len(self._cache) >= EXPERT_CACHE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[entry] = adapter.load(key)
        return self._cache[entry]

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        assert self.compute.processor is not None
        return self.compute.processor.to_device(tensor)

    def rewrite(self, target: Target, shard: str, t: TensorPlan) -> None:
        """Merge (or convert, or replace) one tensor; on CUDA out-of-memory the compute shrinks the
        chunk (or moves to the CPU) and the tensor is merged again from its first row."""
        self.compute.start()
        while True:
            try:
                done = self._rewrite(target, shard, t)
                break
            except Exception as exc:
                if not self.compute.retry_smaller(exc, t.name):
                    raise
        target.events.emit("tensor", target.name, name=t.name, kind=tensor_kind(t), **done)

    def _rewrite(self, target: Target, shard: str, t: TensorPlan) -> dict[str, int | float]:
        """The tensor's rows through decode, deltas and encode; its event's fields (bytes, survives)."""
        proc = self.compute.processor
        assert proc is not None
        src, writer = target.opened(shard)
        origin = t.origin(target.plan.base)
        if t.source is not None:  # an adapter file holds this tensor's base weight
            src = self._source_fd(origin.path)
        decode, encode = self._decoder(t), self._encoder(t, proc.work)
        deltas = [load(d, self) for d in t.deltas]
        if isinstance(encode, Requantizer):  # it keeps W0 of each block, before the deltas
            deltas.insert(0, encode.snapshot)
        rows, cols = t.rows_cols
        align = math.lcm(decode.row_alignment, encode.row_alignment, t.row_alignment)
        step = max(align, proc.capacity // cols // align * align)
        self._first_pass(proc, (src, origin, decode), rows, cols, step, align, deltas, encode)
        if t.tokens is not None:  # replaced rows go last, after every delta
            deltas.append(load_tokens(t.tokens, self))
        written = 0
        for row0, n, slot in self._chunks(proc, src, origin, decode, rows, cols, step):
            try:
                target.io.check()
                out = proc.merge_rows(slot, src=decode, out=encode, row0=row0, rows=n, cols=cols, deltas=deltas,
                                      tensor=t.name, align=align)
                target.io.submit(lambda at=row0 * cols * encode.itemsize, out=out: writer.write(t.name, at, out),
                                 done=slot.free.set)
            except BaseException:
                slot.free.set()
                raise
            written += len(out)
        if not isinstance(encode, Requantizer):
            return {"bytes": written}
        assert t.requant is not None
        scales, name = encode.scale_bytes(), t.requant.scale
        target.io.submit(lambda: writer.write(name, 0, scales))
        survives = encode.survives
        return {"bytes": written + len(scales), **({"survives": survives} if survives is not None else {})}

    def _first_pass(self, proc: Processor, source: tuple[int, Source, Codec], rows: int, cols: int, step: int,
                    align: int, deltas: list[Applied], encode: Codec) -> None:
        """Every row of W shown to the deltas that need it before the merge pass (column DoRA, DEFT ...),
        each at its turn; a per-tensor FP8 scale sees the rows as merged."""
        after = [encode.snapshot] if isinstance(encode, Requantizer) and isinstance(encode.snapshot, FirstPass) else []
        passing = [d for d in deltas if not any(d is a for a in after)]
        observers = [d for d in passing if isinstance(d, FirstPass)] + after
        if not observers:
            return
        for o in observers:
            o.begin(cols, proc.device)
        for row0, n, slot in self._chunks(proc, *source, rows, cols, step):
            try:
                proc.first_pass(slot, src=source[2], row0=row0, rows=n, cols=cols, deltas=passing, after=after,
                                align=align)
            finally:
                slot.free.set()
        for o in observers:
            o.end()

    @staticmethod
    def _encoder(t: TensorPlan, like: torch.Tensor) -> Codec:
        """The codec the output bytes are written with: its dtype's, or a re-quantizer in the base's scheme."""
        if t.requant is None:
            return codec_for(t.out_dtype)
        from ..codecs.fp8_out import encoder

        rows, cols = t.rows_cols
        return encoder((rows, cols), t.requant.block, t.requant.scale_dtype, like)

    def _decoder(self, t: TensorPlan) -> Codec:
        """The codec the tensor's input bytes are read with: its dtype's, or its quantization scheme's
        (with the side tensors, e.g. the scales, loaded on the merge device)."""
        if t.quant is None or t.source is not None:
            return codec_for(t.origin_dtype)
        from ..codecs.plain import read_side  # (torch: loaded by now, never at import)

        side = {k: self.put(read_side(s)) for k, s in t.quant.side.items()}
        return scheme(t.quant.scheme).codec(t.quant, side)

    @staticmethod
    def _chunks(proc: Processor, src: int, origin: Source, codec: Codec, rows: int, cols: int,
                step: int) -> Iterator[tuple[int, int, Slot]]:
        """Each chunk of ``step`` rows read into a free slot: (first row, rows, slot). The consumer
        frees the slot (or hands it to the I/O thread, which frees it after the write)."""
        for row0 in range(0, rows, step):
            n = min(step, rows - row0)
            slot = proc.acquire()
            try:
                raw, at = proc.raw_bytes(slot, n * cols, codec.nbytes(n * cols)), 0
                for offset, length in codec.spans(row0, n, cols):  # (several when stored by column)
                    pread_into(src, origin.data_start + origin.info.begin + offset, raw[at : at + length],
                               path=origin.path)
                    at += length
            except BaseException:
                slot.free.set()
                raise
            yield row0, n, slot

    def _source_fd(self, path: Path) -> int:
        if path not in self._source_fds:
            self._source_fds[path] = os.open(path, os.O_RDONLY)
        return self._source_fds[path]

    def close(self) -> None:
        for fd in self._source_fds.values():
            os.close(fd)
        self._source_fds.clear()
        self._cache.clear()
