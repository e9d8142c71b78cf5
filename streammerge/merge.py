"""The orchestrator: plan, then stream shard by shard within the memory budget; return a report.

1. open the base (index + every header) and the adapters; build the plan (no data read yet);
2. check the output directory and the free disk space;
3. size one set of reusable buffers from ``max_mem``;
4. for every shard: copy untouched tensors byte for byte, merge touched ones in row chunks,
   write the shard into the staging area and fsync it;
5. copy the non-weight files, write the index, and publish everything into the output.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hub
from .adapter import LoraAdapter, changes_something, read_adapter
from .checkpoint import INDEX_NAME, open_base
from .engine import Engine, Runtime
from .errors import Interrupted, OutputError, PlanError
from .keymap import Rule, parse_map
from .manifest import MANIFEST_NAME, build_manifest, reusable_shards, shard_fingerprint, write_json_atomic
from .memory import DEFAULT_MAX_MEM, peak_rss
from .output import STAGING, aux_files, check_free_space, check_output, copy_aux_files, copy_tokenizer, lock_output, default_output, publish, write_index
from .plan import build_plan
from .plantypes import CONFIG_DTYPE_NAMES, MergePlan

@dataclass
class MergeReport:
    output: str
    device: str
    max_mem: int
    dtype: str
    shards: int = 0
    shards_resumed: int = 0
    tensors_merged: int = 0
    tensors_converted: int = 0
    tensors_replaced: int = 0
    tensors_copied: int = 0
    adapter_modules: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    baseline_rss: int = 0
    peak_rss: int = 0
    peak_gpu: int | None = None
    chunk_elements: int = 0
    files_copied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter directory and its weight in a weighted sum (1.0 for a single adapter)."""

    path: Path
    weight: float = 1.0


def load_inputs(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterSpec | str | os.PathLike[str]],
    *,
    dtype: str = "auto",
    maps: Sequence[str] = (),
    allow_noop: bool = False,
) -> MergePlan:
    """Open and validate the base and adapters and build the plan; reads headers (and, to refuse
    an adapter that changes nothing, lora_B factors until a non-zero one is found)."""
    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec(Path(a)) for a in adapters]
    if not specs:
        raise PlanError("no adapter given; pass --adapter DIR")
    user_rules: tuple[Rule, ...] = tuple(parse_map(m) for m in maps)
    checkpoint = open_base(hub.resolve(str(base), role="base"))
    specs = [AdapterSpec(hub.resolve(str(s.path), role="adapter"), s.weight) for s in specs]
    loaded: list[LoraAdapter] = [read_adapter(s.path, weight=s.weight) for s in specs]
    plan = build_plan(checkpoint, loaded, dtype=dtype, user_rules=user_rules)
    if not allow_noop:
        for adapter in loaded:
            if not changes_something(adapter):
                why = "its weight is 0" if adapter.weight == 0 else (
                    "every lora_B is zero, as PEFT initialises it: was the adapter saved before training?")
                raise PlanError(f"adapter {adapter.path} changes nothing ({why}); "
                                "pass --allow-noop to write an unchanged copy anyway")
    return plan


def _finish_output(plan: MergePlan, staging: Path, out: Path, report: MergeReport, manifest: dict[str, Any]) -> None:
    """Non-weight files (config changes applied), the tokenizer of a resized vocabulary, the index and
    the manifest into the staging area; then everything into ``out``, the manifest last."""
    report.files_copied = copy_aux_files(plan.base.root, staging, config_dtype=CONFIG_DTYPE_NAMES.get(plan.out_dtype or ""),
                                         config_changes=plan.config_changes)
    if plan.tokenizer_from is not None:
        from_adapter = copy_tokenizer(plan.tokenizer_from, staging)
        report.files_copied = sorted(set(report.files_copied) | set(from_adapter))
        report.notes.append(
            f"vocabulary resized to {plan.config_changes['vocab_size']}: tokenizer files "
            f"{', '.join(from_adapter)} taken from {plan.tokenizer_from}" if from_adapter else
            f"vocabulary resized to {plan.config_changes['vocab_size']} but {plan.tokenizer_from} has no "
            "tokenizer files: the base's tokenizer was copied; make sure it knows the new tokens")
    last = [INDEX_NAME] if plan.base.sharded else []
    if plan.base.sharded:
        write_index(staging, plan.base, plan.weight_map, plan.output_size)
    write_json_atomic(staging / MANIFEST_NAME, manifest)
    publish(staging, out, first=list(plan.shards), middle=report.files_copied, last=last + [MANIFEST_NAME])


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterSpec | str | os.PathLike[str]],
    *,
    output: str | os.PathLike[str] | None = None,
    device: str = "auto",
    max_mem: int = DEFAULT_MAX_MEM,
    dtype: str = "auto",
    overwrite: bool = False,
    maps: Sequence[str] = (),
    progress: bool = True,
    checksum: bool = True,
    allow_noop: bool = False,
) -> MergeReport:
    """Merge LoRA adapters into a safetensors checkpoint, shard by shard, within ``max_mem`` bytes.

    Each touched weight becomes ``W + sum_i w_i * s_i * (B_i @ A_i)`` computed in float32 and
    rounded once to the output dtype (``s = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    Untouched tensors are copied byte for byte. Raises a StreamMergeError subclass on bad input,
    before anything is written. An interrupted run (signal, full disk, kill) leaves its finished
    shards in ``output/.streammerge-partial``; the same call again resumes from them.
    """
    started = time.perf_counter()
    runtime = Runtime()  # torch loads in the background while the plan is built
    plan = load_inputs(base, adapters, dtype=dtype, maps=maps, allow_noop=allow_noop)
    if output is not None:
        out = Path(output)
    elif hub.is_repo_id(str(base)):  # never beside a snapshot inside the Hub cache
        out = Path.cwd() / f"{str(base).split('@')[0].split('/')[-1]}-merged"
    else:
        out = default_output(Path(base))
    check_output(out, base=plan.base.root, adapters=[a.path for a in plan.adapters], overwrite=overwrite)
    engine = Engine(plan, device=device, max_mem=max_mem, runtime=runtime)
    report = MergeReport(str(out), device, max_mem, dtype)
    staging = out / STAGING
    fingerprints = {s: shard_fingerprint(plan, s, device=device, chunk=engine.chunk) for s in plan.shards}
    created = not out.exists()
    try:
        if device != "cpu":
            engine.start_compute()  # a missing CUDA device is refused before anything is written
        lock = lock_output(staging)
    except BaseException:
        engine.close()
        raise
    try:
        kept = reusable_shards(staging, fingerprints)
        need = plan.output_size - sum(r["size"] for r in kept.values())
        check_free_space(out, need + sum((plan.base.root / f).stat().st_size for f in aux_files(plan.base.root)))
        engine.run(staging, report, progress=progress, kept=kept, fingerprints=fingerprints, checksum=checksum)
        options = {"dtype": dtype, "device": device, "max_mem": max_mem, "maps": list(maps), "checksum": checksum}
        _finish_output(plan, staging, out, report, build_manifest(plan, engine.records, options))
    except BaseException as exc:
        engine.close()  # first: no write may still be pending when files are removed
        resumable = isinstance(exc, (KeyboardInterrupt, Interrupted, OutputError)) and engine.records
        if resumable:
            reusable_shards(staging, fingerprints)  # keep recorded shards only: no partial file stays
        else:
            shutil.rmtree(staging, ignore_errors=True)
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    finally:
        os.close(lock)
    engine.close()
    report.adapter_modules = sum(len(a.modules) for a in plan.adapters)
    report.seconds = time.perf_counter() - started
    report.peak_rss = peak_rss()
    return report
