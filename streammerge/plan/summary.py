"""What ``plan`` shows: the plan as a JSON-able summary, and its modules grouped by rule, method and
layer range (one line per group: a 72B model's 560 modules fit on a screen)."""

from __future__ import annotations

import re
from typing import Any

from .types import MergePlan

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # layer and expert numbers in a dotted name


def summary(plan: MergePlan) -> dict[str, Any]:
    """Which module goes where, by which rule; what is replaced, added, excluded, changed."""
    modules = [{"adapter": d.adapter.label, "module": d.lora.module, "tensor": t.name, "rule": d.rule, "r": d.lora.r,
                "scale": d.scale, "kind": d.method if d.expert < 0 else f"{d.method} {d.expert}",
                "method": d.method}
               for t in plan.touched for d in t.deltas]
    return {
        "base": str(plan.base.root),
        "adapters": [str(a.path) for a in plan.adapters],
        "out_dtype": plan.out_dtype or "auto",
        "tensors_merged": len(plan.touched),
        "tensors_total": sum(1 for _ in plan.tensors()),
        "output_bytes": plan.output_size,
        "groups": groups(modules),
        "modules": modules,
        "replaced": {t.name: f"{t.source.path}:{t.source.info.name} {list(t.source.info.shape)}"
                     for t in plan.tensors() if t.source is not None},
        "token_rows": {t.name: list(t.tokens.ids) for t in plan.tensors() if t.tokens is not None},
        "added": sorted(set(plan.weight_map) - set(plan.base.weight_map)),
        "excluded": plan.excluded,
        "config_changes": plan.config_changes,
        "tokenizer_from": str(plan.tokenizer_from) if plan.tokenizer_from else None,
        "tokenizer_why": plan.tokenizer_why,
        "quantized": quantized(plan),
        "base_kind": f"quantized ({plan.dequantized or plan.requantized})"
                     if plan.dequantized or plan.requantized else "16-bit",
        "notes": plan.notes,
    }


def quantized(plan: MergePlan) -> dict[str, Any] | None:
    """A quantized base: its scheme, how many weights it dequantizes, to what, and the bytes in and out."""
    scheme = plan.dequantized or plan.requantized
    if scheme is None:
        return None
    tensors = [t for t in plan.tensors() if t.quant is not None]
    return {"scheme": scheme, "tensors": len(tensors), "dtype": plan.config_dtype,
            "requantized": sum(t.requant is not None for t in tensors) if plan.requantized else None,
            "bytes_in": plan.base.total_size, "bytes_out": plan.output_size, "families": families(tensors)}


def ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``0-2,5,7-8``."""
    out: list[str] = []
    for v in sorted(set(values)):
        if out and v == int(out[-1].rpartition("-")[2]) + 1:
            out[-1] = f"{out[-1].partition('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ",".join(out)


def _pattern(template: str, numbers: list[list[int]]) -> str:
    """``model.layers.#.q_proj.weight`` with ``#`` as the range of each slot's numbers."""
    parts = template.split("#")
    shown = [ranges(n) for n in numbers]
    return parts[0] + "".join((f"{{{s}}}" if "," in s or "-" in s else s) + p for s, p in zip(shown, parts[1:]))


def _by_layers(entries: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[str, int, tuple[Any, ...]]]:
    """(name, what else must match) -> (the name with each layer or expert number as a range, how
    many, what else matched), for names that differ only in their numbers."""
    found: dict[tuple[str, tuple[Any, ...]], list[list[int]]] = {}
    counts: dict[tuple[str, tuple[Any, ...]], int] = {}
    for name, extra in entries:
        key = (_INDEX.sub("#", name), extra)
        numbers = [int(n) for n in _INDEX.findall(name)]
        slots = found.setdefault(key, [[] for _ in numbers])
        counts[key] = counts.get(key, 0) + 1
        for slot, n in zip(slots, numbers):
            slot.append(n)
    return [(_pattern(template, slots), counts[(template, extra)], extra) for (template, extra), slots in found.items()]


def groups(modules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Modules that differ only in their layer (or expert) numbers, with the same adapter, rule,
    method, rank and scale, as one entry."""
    entries = [(m["tensor"], (m["adapter"], m["rule"], m["method"], m["r"], m["scale"])) for m in modules]
    return [{"adapter": adapter, "tensors": pattern, "count": count, "rule": rule, "method": method, "r": r,
             "scale": scale} for pattern, count, (adapter, rule, method, r, scale) in _by_layers(entries)]


def families(tensors: list[Any]) -> list[dict[str, Any]]:
    """Quantized tensors that differ only in their layer numbers, with the same scheme and structural
    parameters (block sizes; not per-tensor values such as a double quantization's offset)."""
    entries = [(t.name, (t.quant.scheme, tuple(p for p in t.quant.params if not isinstance(p, float))))
               for t in tensors]
    return [{"tensors": pattern, "count": count, "scheme": scheme, "params": list(params)}
            for pattern, count, (scheme, params) in _by_layers(entries)]
