"""``streammerge verify``: re-read a merged output independently and check it against its inputs.

1. the manifest must be there (a directory without it is not a finished merge);
2. the output's index and every header are parsed with the strict parser; the tensor set, shard
   assignment, shapes, dtypes and the index's total_size must match what the plan says;
3. each shard's sha256 must match the manifest (where the merge recorded one);
4. every untouched tensor is compared with the base byte for byte (converted ones after the same
   conversion); every merged tensor has a sample of rows recomputed in float64 from base + adapter
   and must lie within one rounding of it (half an ulp of the output dtype, plus the float32
   accumulation bound (r + 2) * 2^-24 * sum |terms|).
Memory stays bounded: data is read in blocks and rows, never whole tensors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .baserows import Reader, as_tensor, base_rows
from .checkrows import EXTRA_ROWS, Factors64
from .checkwhole import WHOLE_ROWS
from .codecs.plain import TORCH_DTYPES
from .deltas.lora import select_expert
from .errors import StreamMergeError
from .formats.checkpoint import INDEX_NAME, BaseCheckpoint, open_base
from .formats.header import DTYPE_SIZES
from .inputs import AdapterSpec, load_inputs
from .memory import current_rss, peak_rss, reset_peak_rss
from .output.checksum import sha256_file
from .output.manifest import MANIFEST_NAME, read_manifest
from .plan.types import Delta, Source, TensorPlan

BLOCK = 8 * 1024**2
_MAX_PROBLEMS = 20


@dataclass
class VerifyReport:
    output: str
    kind: str = "safetensors"  # or "gguf": every tensor sampled (no bytes to compare: they were converted)
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    tensors_compared: int = 0  # untouched: every byte
    tensors_sampled: int = 0  # merged: sampled rows against float64
    rows_sampled: int = 0
    max_error_ratio: float = 0.0  # largest |out - exact| / bound seen (<= 1 passes)
    shards_hashed: int = 0
    notes: list[str] = field(default_factory=list)  # what the checks could not tell
    seconds: float = 0.0
    baseline_rss: int = 0
    peak_rss: int = 0

    def fail(self, problem: str) -> None:
        self.ok = False
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(problem)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_structure(plan_tensors: dict[str, TensorPlan], base: BaseCheckpoint, out: BaseCheckpoint,
                     report: VerifyReport) -> None:
    missing, extra = set(plan_tensors) - set(out.weight_map), set(out.weight_map) - set(plan_tensors)
    if missing or extra:
        report.fail(f"tensor set differs from the base: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    for name, t in plan_tensors.items():
        if name not in out.weight_map:
            continue
        got = out.info(name)
        if out.weight_map[name] != t.shard:
            report.fail(f"{name}: in shard {out.weight_map[name]}, expected {t.shard}")
        if got.shape != t.info.shape or got.dtype != t.out_dtype:
            report.fail(f"{name}: {got.dtype}{list(got.shape)} but expected {t.out_dtype}{list(t.info.shape)}")
    if out.sharded and out.index_metadata.get("total_size") != out.total_size:
        report.fail(f"{INDEX_NAME}: total_size {out.index_metadata.get('total_size')} but the shards hold {out.total_size}")


def _output(out: BaseCheckpoint, name: str) -> Source:
    header = out.shards[out.weight_map[name]]
    return Source(header.path, header.data_start, header.tensors[name])


def _compare_untouched(t: TensorPlan, base: BaseCheckpoint, out: BaseCheckpoint, io: Reader, report: VerifyReport) -> None:
    src, dst = t.origin(base), _output(out, t.name)
    src_item, out_item = DTYPE_SIZES[src.info.dtype], DTYPE_SIZES[t.out_dtype]
    step = max(1, BLOCK // max(src_item, out_item))  # elements per block
    for start in range(0, t.info.numel, step):
        n = min(step, t.info.numel - start)
        want = io.read(src, start * src_item, n * src_item)
        got = io.read(dst, start * out_item, n * out_item)
        if t.out_dtype != src.info.dtype:  # converted: the same single rounding, compared bit for bit
            converted = as_tensor(want, src.info.dtype).to(TORCH_DTYPES[t.out_dtype])
            want = bytearray(converted.view(torch.uint8).numpy().tobytes())
        if want != got:
            report.fail(f"{t.name}: differs from the base within elements {start}..{start + n - 1}")
            return
    report.tensors_compared += 1


def _check_finite(t: TensorPlan, out: BaseCheckpoint, io: Reader, report: VerifyReport) -> None:
    """Every element of a rewritten tensor (merged, replaced or converted) must be finite: a merge
    whose sum, or a conversion whose rounding, overflowed the output dtype wrote Inf."""
    dst = _output(out, t.name)
    item = DTYPE_SIZES[t.out_dtype]
    step = max(1, BLOCK // item)
    for start in range(0, t.info.numel, step):
        n = min(step, t.info.numel - start)
        block = as_tensor(io.read(dst, start * item, n * item), t.out_dtype)
        # NaN / Inf make the sum non-finite; a sum that merely overflows is told apart by min / max
        # (neither allocates a block-sized mask, which would break verify's memory bound)
        if not math.isfinite(float(block.sum())) and not all(math.isfinite(float(x)) for x in torch.aminmax(block)):
            report.fail(f"{t.name}: NaN or Inf in the output within elements {start}..{start + n - 1}")
            return


class ExactRows:
    """Rows of a merged tensor recomputed in float64 from base + adapters, each with the float32
    arithmetic bound its merge may add (the output dtype's rounding not included)."""

    def __init__(self, t: TensorPlan, base: BaseCheckpoint, io: Reader) -> None:
        self.t, self.io = t, io
        self.rows, self.cols = t.rows_cols
        self.factors = [None if d.method in METHOD_ROWS else  # (other PEFT methods: checkrows.py, checkwhole.py)
                        (None, d.adapter.load(d.lora.bias_key).double(), d.scale, "vector") if d.vector else
                        (*(f.double() for f in _factors(d)), d.scale, d.transposed)
                        for d in t.deltas]
        self.f64 = Factors64()
        self.dora_m = next((d.adapter.load(d.lora.magnitude_key).double() for d in t.deltas
                            if d.lora.magnitude_key and not d.transposed), None)
        self.r_max = max((f[0].shape[0] for f in self.factors if f is not None and f[0] is not None), default=0)
        self.token_values = dict(zip(t.tokens.ids, t.tokens.adapter.load(t.tokens.key).double())) if t.tokens else {}
        self.src = t.origin(base)
        column_m = next((d.adapter.load(d.lora.magnitude_key).double() for d in t.deltas
                         if d.lora.magnitude_key and d.transposed), None)
        self.column_scale = None if column_m is None else \
            column_m / _column_norms(t, self.src, self.factors, io, self.rows, self.cols)

    def picks(self, rows_per_tensor: int, rng: random.Random) -> list[int]:
        return pick_rows(self.rows, rows_per_tensor, rng, also=list(self.token_values)[:4])

    def base_row(self, row: int) -> torch.Tensor:
        return base_rows(self.t, self.src, self.io, row, 1, self.cols)[0]

    def __call__(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(base row, exact merged row, arithmetic bound) for ``row``."""
        t, w = self.t, self.base_row(row)
        exact, size, roundings = _exact_row(lambda r: w if r == row else self.base_row(r), t.deltas, self.factors,
                                            row, self.f64)
        # (+ 4: a dequantization's own float32 roundings: scale products, a double-quantized absmax)
        arithmetic = (max(self.r_max, roundings) + 2 + (4 if t.quant else 0)) * 2.0**-24 * size
        if self.column_scale is not None:  # column DoRA: the norms come from every row; float64 sums of squares
            exact = exact * self.column_scale
            arithmetic = arithmetic * self.column_scale.abs() + (self.rows + 4) * 2.0**-24 * exact.abs()
        if row in self.token_values:  # a replaced token row: the saved values, rounded once
            exact, arithmetic = self.token_values[row].clone(), torch.zeros_like(exact)
        if self.dora_m is not None:  # DoRA: the row rescaled to m / ||row||; its float32 norm adds (cols + 4) * 2^-24
            factor = float(self.dora_m[row] / exact.norm())
            exact = exact * factor
            arithmetic = arithmetic * abs(factor) + (self.cols + 4) * 2.0**-24 * exact.abs()
        return w, exact, arithmetic


def pick_rows(rows: int, count: int, rng: random.Random, *, also: Sequence[int] = ()) -> list[int]:
    """The rows verify samples: the first, the last, ``count - 2`` drawn by ``rng``, and ``also``."""
    return sorted({0, rows - 1} | {rng.randrange(rows) for _ in range(max(0, count - 2))} | set(also))


def half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half an ulp of ``dtype`` at each |x| (subnormals: half the smallest step)."""
    finfo = torch.finfo(dtype)
    _, e = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), e - 1).mul(finfo.eps).clamp_min(finfo.smallest_normal * finfo.eps) / 2


def _sample_rows(t: TensorPlan, base: BaseCheckpoint, out: BaseCheckpoint, io: Reader, report: VerifyReport,
                 *, rows_per_tensor: int, rng: random.Random) -> None:
    exact_rows = ExactRows(t, base, io)
    cols = exact_rows.cols
    dst, out_item = _output(out, t.name), DTYPE_SIZES[t.out_dtype]
    for row in exact_rows.picks(rows_per_tensor, rng):
        _, exact, arithmetic = exact_rows(row)
        got = as_tensor(io.read(dst, row * cols * out_item, cols * out_item), t.out_dtype).double()
        bound = half_ulp(exact, TORCH_DTYPES[t.out_dtype]) + arithmetic
        err = (got - exact).abs()
        ratio = float((err / bound).nan_to_num(nan=float("inf")).max()) if cols else 0.0
        report.max_error_ratio = max(report.max_error_ratio, ratio)
        report.rows_sampled += 1
        if not ratio <= 1.0:
            report.fail(f"{t.name}: row {row} is off by up to {ratio:.3g}x the one-rounding bound "
                        f"(max error {float(err.max()):.3e})")
            return
    report.tensors_sampled += 1


def _sample_requantized(t: TensorPlan, base: BaseCheckpoint, out: BaseCheckpoint, io: Reader, report: VerifyReport,
                        *, rows_per_tensor: int, rng: random.Random) -> None:
    """Sampled rows of a re-quantized FP8 weight (``codecs.fp8_out``), read back with the scales written
    beside them: no value clipped (|x| <= 448 s) and each within half an e4m3 step (3 mantissa bits;
    2^-9 s below 2^-6 s) of the float64 merge x, plus the float32 arithmetic bound."""
    assert t.quant is not None and t.requant is not None
    rows, cols = t.rows_cols
    written = TensorPlan(t.name, t.shard, t.info, t.out_dtype,
                         quant=dataclasses.replace(t.quant, side={"scale": _output(out, t.requant.scale)}))
    factors = [(*(f.double() for f in _factors(d)), d.scale, d.transposed) for d in t.deltas]
    r_max = max(_factors(d)[0].shape[0] for d in t.deltas)
    bn, bk = t.requant.block
    for row in sorted({0, rows - 1} | {rng.randrange(rows) for _ in range(max(0, rows_per_tensor - 2))}):
        exact, size = _additive(base_rows(t, t.origin(base), io, row, 1, cols)[0], factors, row)
        got = base_rows(written, _output(out, t.name), io, row, 1, cols)[0]  # the codes times their scales
        scale = _scale_row(written, io, row, cols, bn, bk)
        _, e = torch.frexp(exact / scale)
        step = torch.ldexp(torch.ones_like(exact), (e - 5).clamp_min(-10)) * scale  # half an e4m3 step
        bound = step + (r_max + 6) * 2.0**-24 * size
        ratio = float(((got - exact).abs() / bound).max())
        report.max_error_ratio, report.rows_sampled = max(report.max_error_ratio, ratio), report.rows_sampled + 1
        if not ratio <= 1.0 or bool((exact.abs() > 448 * scale * (1 + 2.0**-20) + bound).any()):
            report.fail(f"{t.name}: row {row} re-quantized off by up to {ratio:.3g}x half an FP8 step, or clipped")
            return
    report.tensors_sampled += 1


def _scale_row(t: TensorPlan, io: Reader, row: int, cols: int, bn: int, bk: int) -> torch.Tensor:
    """The written scale of every element of ``row`` (float64)."""
    assert t.quant is not None
    side = t.quant.side["scale"]
    grid = as_tensor(io.read(side, 0, side.info.nbytes), side.info.dtype).double().view(-1, -(-cols // bk))
    return grid[row // bn][torch.arange(cols) // bk]


METHOD_ROWS = {**EXTRA_ROWS, **WHOLE_ROWS}


def _exact_row(base_row: Callable[[int], torch.Tensor], deltas: list[Delta], factors: list[Any], row: int,
               f64: Factors64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Row ``row`` of W changed by each delta in order, in float64: LoRA-like factors here, other
    methods by checkrows (which may ask for another row as it was before them: RoAd's pairs); the
    sum of |terms| and the most float32 roundings any term took."""
    w = base_row(row)
    exact, size, roundings = w.clone(), w.abs(), 0
    for i, (d, f) in enumerate(zip(deltas, factors)):
        if f is None:
            def before(other: int, i: int = i) -> tuple[torch.Tensor, torch.Tensor]:
                return _exact_row(base_row, deltas[:i], factors[:i], other, f64)[:2]

            exact, size, r = METHOD_ROWS[d.method](d, row, exact, size, f64, before)
            roundings = max(roundings, r)
        else:
            exact, size = _additive(exact, [f], row, size)
    return exact, size, roundings


def _additive(w: torch.Tensor, factors: list[Any], row: int,
              size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``row`` of W + sum of the additive deltas in float64, and the sum of |terms| (for the
    float32 error bound)."""
    exact, size = w.clone(), (w.abs() if size is None else size.clone())
    for a, b, scale, transposed in factors:
        if transposed == "vector":  # lora_bias: the bias is one row
            exact += scale * b
            size += abs(scale) * b.abs()
        elif transposed:  # row of (B @ A).T = A[:, row] @ B.T
            exact += scale * (a[:, row] @ b.t())
            size += abs(scale) * (a[:, row].abs() @ b.abs().t())
        else:  # (r,) @ (r, cols)
            exact += scale * (b[row] @ a)
            size += abs(scale) * (b[row].abs() @ a.abs())
    return exact, size


def _factors(d: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = d.adapter.load(d.lora.a_key), d.adapter.load(d.lora.b_key)
    return select_expert(d, a, b) if d.expert >= 0 else (a, b)


def _column_norms(t: TensorPlan, src: Source, factors: list, io: Reader, rows: int, cols: int) -> torch.Tensor:
    """||column of W + dW|| over all rows, in float64, reading BLOCK bytes of rows at a time."""
    step = max(1, BLOCK // (cols * 8))
    acc = torch.zeros(cols, dtype=torch.float64)
    for r0 in range(0, rows, step):
        k = min(step, rows - r0)
        v = base_rows(t, src, io, r0, k, cols)
        for a, b, scale, transposed in factors:
            v += scale * (a[:, r0 : r0 + k].t() @ b.t() if transposed else b[r0 : r0 + k] @ a)
        acc += v.square().sum(dim=0)
    return acc.sqrt()


def verify(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterSpec | str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    rows_per_tensor: int = 8,
    seed: int = 0,
) -> VerifyReport:
    """Check a merged output against its base and adapters; the report says what differs."""
    started = time.perf_counter()
    reset_peak_rss()
    out_dir = Path(output)
    report = VerifyReport(str(out_dir), baseline_rss=current_rss())
    manifest = read_manifest(out_dir)
    if manifest is None:
        report.fail(f"{out_dir}: no {MANIFEST_NAME}: not a finished streammerge output (interrupted, or not ours)")
        return report
    options = manifest.get("options", {})
    plan = load_inputs(base, adapters, **{k: options[k] for k in ("dtype", "maps", "include", "exclude") if k in options})
    try:
        out = open_base(out_dir)
    except StreamMergeError as exc:
        report.fail(str(exc))
        return report
    plan_tensors = {t.name: t for t in plan.tensors()}
    _check_structure(plan_tensors, plan.base, out, report)
    for shard, entry in manifest.get("shards", {}).items():
        if entry.get("sha256") is not None:
            path = out_dir / shard
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                report.fail(f"{path}: sha256 does not match the manifest")
            report.shards_hashed += 1
    if not report.ok:  # a broken layout makes the element checks meaningless
        report.seconds = time.perf_counter() - started
        return report
    _check_elements(plan_tensors, plan.base, out, report, rows_per_tensor=rows_per_tensor, seed=seed)
    report.seconds = time.perf_counter() - started
    report.peak_rss = peak_rss()
    return report


def _check_elements(plan_tensors: dict[str, TensorPlan], base: BaseCheckpoint, out: BaseCheckpoint,
                    report: VerifyReport, *, rows_per_tensor: int, seed: int) -> None:
    io, rng = Reader(), random.Random(seed)
    try:
        for t in plan_tensors.values():
            if t.requant is not None:  # written back as FP8: within half a code of the exact merge
                _sample_requantized(t, base, out, io, report, rows_per_tensor=rows_per_tensor, rng=rng)
            elif t.merged or t.dequantized:  # within one rounding
                _sample_rows(t, base, out, io, report, rows_per_tensor=rows_per_tensor, rng=rng)
            elif t.written_by is not None:  # a scale tensor: checked with its weight's codes
                continue
            else:
                _compare_untouched(t, base, out, io, report)
            if t.rewritten and t.out_dtype in TORCH_DTYPES:
                _check_finite(t, out, io, report)
    finally:
        io.close()


def recorded_inputs(output: str | os.PathLike[str]) -> tuple[str, list[AdapterSpec]]:
    """The base and adapters (with weights) an output's manifest records."""
    from .errors import InputError

    manifest = read_manifest(Path(output))
    if manifest is None:
        raise InputError(f"{output}: no {MANIFEST_NAME}: not a finished streammerge output (interrupted, or not "
                         "ours); pass --base and --adapter to check it anyway")
    try:
        base = manifest["base"]["path"]
        adapters = [AdapterSpec(Path(a["path"]), float(a["weight"])) for a in manifest["adapters"]]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{output}/{MANIFEST_NAME}: does not record its base and adapters; pass --base and "
                         "--adapter") from None
    return base, adapters


def verify_recorded(output: str | os.PathLike[str], *, rows_per_tensor: int = 8, seed: int = 0) -> VerifyReport:
    """``verify`` with the base and adapters read from the output's manifest."""
    base, adapters = recorded_inputs(output)
    return verify(base, adapters, output, rows_per_tensor=rows_per_tensor, seed=seed)
