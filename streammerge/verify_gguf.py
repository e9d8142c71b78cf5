"""``streammerge verify`` of a GGUF output: read the file back with gguf's own reader and hold it
against the base and adapters it was merged from.

1. the architecture, the file type and every tensor (name, type, shape) must be what a merge of
   these inputs writes in that type (``formats/gguf_layout.py``), no more and no fewer;
2. each checkpoint tensor has a sample of rows found in the file (llama's q / k rows where the
   converter's permutation puts them, an expert's rows in its slice of the stack), dequantized by
   gguf and compared with the float64 recomputation from base + adapters (``verify.ExactRows``; an
   untouched tensor: the base row itself). The allowed error is the merge's one rounding to the
   checkpoint's dtype plus what the GGUF type can lose: nothing (F32), half an ulp (F16, BF16), or
   per block of 32 from its stored scale d (and minimum m): d / 2 for the rounding types (Q8_0, Q4_1,
   Q5_1), d for Q4_0 / Q5_0 (whose most positive code is clamped), plus the scale's own f16 rounding
   (2^-11 of d times the largest code, 2^-11 of |m|);
3. a merged row whose change is smaller than that loss is counted in a note: the type's rounding
   can hide an adapter, and verify cannot tell such rows from unmerged ones.
A GGUF has no manifest: the base and adapters are named on the command line.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .baserows import Reader, base_rows
from .errors import StreamMergeError
from .inputs import AdapterSpec, load_inputs
from .memory import current_rss, peak_rss, reset_peak_rss
from .plan.types import TensorPlan
from .verify import ExactRows, VerifyReport, half_ulp, pick_rows

# per block type: elements a block, the clamp or rounding step (in d), the largest |code|, whether m is stored
BLOCKS = {"Q8_0": (32, 0.5, 127, False), "Q4_0": (32, 1.0, 16, False), "Q5_0": (32, 1.0, 16, False),
          "Q4_1": (32, 0.5, 15, True), "Q5_1": (32, 0.5, 31, True)}
F16_EPS = 2.0**-11  # an f16's relative half-ulp


def verify_gguf(base: str | os.PathLike[str], adapters: Sequence[AdapterSpec | str | os.PathLike[str]],
                output: str | os.PathLike[str], *, rows_per_tensor: int = 8, seed: int = 0, maps: Sequence[str] = (),
                include: Sequence[str] = (), exclude: Sequence[str] = ()) -> VerifyReport:
    """Check a GGUF file written by a merge against its base and adapters; the report says what differs."""
    import gguf

    started = time.perf_counter()
    reset_peak_rss()
    path = Path(output)
    report = VerifyReport(str(path), kind="gguf", baseline_rss=current_rss())
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        report.fail(f"{path}: not a readable GGUF file ({exc})")
        return report
    plan = load_inputs(base, adapters, maps=maps, include=tuple(include), exclude=tuple(exclude))
    try:
        expected = _expected_layout(reader, plan)
    except StreamMergeError as exc:
        report.fail(str(exc))
        return report
    tensors = {t.name: t for t in reader.tensors}
    _check_structure(expected, tensors, report)
    if report.ok:
        _check_rows(plan, expected, tensors, path, report, rows_per_tensor=rows_per_tensor, seed=seed)
    report.seconds, report.peak_rss = time.perf_counter() - started, peak_rss()
    return report


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _expected_layout(reader: Any, plan: Any) -> Any:
    """What a merge of ``plan`` writes in the file's own type (an unknown type or arch is refused)."""
    import gguf

    from .errors import InputError
    from .formats.gguf_layout import OUTTYPES, layout
    from .formats.gguf_meta import read_config

    file_type = _field(reader, "general.file_type")
    names = {ft: name for name, (ft, _) in OUTTYPES.items()}
    kind = gguf.LlamaFileType(file_type).name if file_type is not None else None
    if kind not in names:
        raise InputError(f"general.file_type {kind or 'missing'} is not a type streammerge writes "
                         f"({', '.join(OUTTYPES)})")
    config = read_config(plan.base.root)
    out = layout(plan, names[kind], config)
    if _field(reader, "general.architecture") != out.arch_name:
        raise InputError(f"general.architecture is {_field(reader, 'general.architecture')!r}, but a merge of "
                         f"this base writes {out.arch_name!r}")
    return out


def _check_structure(expected: Any, tensors: dict[str, Any], report: VerifyReport) -> None:
    files = expected.files()
    missing, extra = set(files) - set(tensors), set(tensors) - set(files)
    if missing or extra:
        report.fail(f"tensor set differs: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    for name, parts in files.items():
        if name in tensors:
            got = tensors[name]
            shape = [int(d) for d in reversed(got.shape)]  # (gguf lists the row length first)
            if got.tensor_type.name != parts[0].qtype or shape != list(parts[0].gguf_shape):
                report.fail(f"{name}: {got.tensor_type.name}{shape} but expected {parts[0].qtype}"
                            f"{list(parts[0].gguf_shape)}")


def _check_rows(plan: Any, expected: Any, tensors: dict[str, Any], path: Path, report: VerifyReport, *,
                rows_per_tensor: int, seed: int) -> None:
    io, rng = Reader(), random.Random(seed)
    hidden = merged_rows = 0
    try:
        with open(path, "rb") as f:
            for t in plan.tensors():
                if t.name not in expected.tensors:
                    continue  # (left out of the file, as the converter leaves it)
                part = expected.tensors[t.name]
                h, m = _check_tensor(t, part, tensors[part.gguf_name], f, plan.base, io, report,
                                     rows_per_tensor=rows_per_tensor, rng=rng)
                hidden, merged_rows = hidden + h, merged_rows + m
                if not report.ok:
                    return
    finally:
        io.close()
    if hidden:
        report.notes.append(f"on {hidden} of {merged_rows} sampled merged rows the adapter's change is within the "
                            "GGUF type's rounding: such rows cannot be told from unmerged ones")


def _check_tensor(t: TensorPlan, part: Any, stored: Any, f: Any, base: Any, io: Reader, report: VerifyReport, *,
                  rows_per_tensor: int, rng: random.Random) -> tuple[int, int]:
    """Sampled rows of one checkpoint tensor; (rows whose change the type hides, merged rows sampled)."""
    shape = t.info.shape
    cols = shape[-1] if shape else 1
    rows = t.info.numel // cols if cols else 0  # (rows as the file keeps them: every dimension but the last)
    merged = t.merged or t.dequantized
    exact_rows = ExactRows(t, base, io) if merged else None
    picks = exact_rows.picks(rows_per_tensor, rng) if exact_rows else pick_rows(rows, rows_per_tensor, rng)
    where = _row_places(rows, part.heads)
    row_bytes = int(stored.n_bytes) // (rows * part.count)
    hidden = 0
    for row in picks:
        if exact_rows is not None:
            w, exact, arithmetic = exact_rows(row)
            bound = half_ulp(exact, _torch_dtype(t.out_dtype)) + arithmetic
        else:
            w = exact = base_rows(t, t.origin(base), io, row, 1, cols)[0]
            bound = torch.zeros_like(exact)
        if part.plus_one:  # (Gemma's norms: 1 + w, in float32)
            exact = exact + 1
            bound = bound + half_ulp(exact, torch.float32)
        f.seek(int(stored.data_offset) + (part.index * rows + where[row]) * row_bytes)
        got, loss = _dequantized(f.read(row_bytes), part.qtype, cols)
        err = (got - exact).abs()
        allowed = bound + loss
        ratio = float(torch.where(err == 0, 0.0, err / allowed).nan_to_num(nan=float("inf")).max()) if cols else 0.0
        report.max_error_ratio, report.rows_sampled = max(report.max_error_ratio, ratio), report.rows_sampled + 1
        if not ratio <= 1.0:
            report.fail(f"{t.name} ({part.gguf_name}): row {row} is off by up to {ratio:.3g}x what the merge's "
                        f"rounding and {part.qtype} allow (max error {float(err.max()):.3e})")
            return hidden, len(picks) if merged else 0
        if merged and float((exact - w - (1 if part.plus_one else 0)).abs().max()) <= float(loss.max()):
            hidden += 1
    report.tensors_sampled += 1
    return hidden, len(picks) if merged else 0


def _row_places(rows: int, heads: int) -> list[int]:
    """Where each checkpoint row is in the file: as is, or (llama's q / k) permuted as the converter
    does it, ``reshape(heads, 2, rows // heads // 2).swapaxes(1, 2)``."""
    if not heads:
        return list(range(rows))
    order = torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)  # file row -> row
    places = [0] * rows
    for file_row, row in enumerate(order.tolist()):
        places[row] = file_row
    return places


def _dequantized(raw: bytes, qtype: str, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row as gguf dequantizes it (float64) and the most its type may have lost at each element."""
    import gguf
    import numpy as np

    data = np.frombuffer(raw, dtype=np.uint8)
    if qtype in ("F32", "F16"):
        got = torch.from_numpy(data.view(np.float32 if qtype == "F32" else np.float16).astype(np.float64))
        return got, (torch.zeros_like(got) if qtype == "F32" else half_ulp(got, torch.float16))
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    got = torch.from_numpy(gguf.quants.dequantize(data.reshape(1, -1), kind).reshape(-1).astype(np.float64))
    if qtype == "BF16":
        return got, half_ulp(got, torch.bfloat16)
    block, step, code, with_min = BLOCKS[qtype]
    size = len(raw) // (cols // block)
    scales = np.frombuffer(raw, dtype=np.float16).reshape(-1, size // 2)  # d, then m, at the start of each block
    d = torch.from_numpy(np.abs(scales[:, 0].astype(np.float64)))
    loss = d * (step + code * F16_EPS * 1.01)
    if with_min:
        loss = loss + torch.from_numpy(np.abs(scales[:, 1].astype(np.float64))) * F16_EPS
    return got, loss.repeat_interleave(block)


def _torch_dtype(dtype: str) -> torch.dtype:
    from .codecs.plain import TORCH_DTYPES

    return TORCH_DTYPES[dtype]
