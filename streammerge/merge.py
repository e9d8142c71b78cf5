"""The API: plan, then stream shard by shard within the memory budget; return the report(s).

1. open the base (index + every header; a Hub base without its shards) and the adapters; build
   one plan per output (no tensor data read yet);
2. check each output directory (and, in ``stream.py``, the free disk space);
3. size one set of reusable buffers from ``max_mem``, shared by every output;
4. for every shard (``stream.py`` / ``engine.py``): copy untouched tensors byte for byte, merge
   touched ones in row chunks, write the shard into the staging area and fsync it;
5. copy the non-weight files, write the index, and publish everything into the output.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hub
from .adapter import LoraAdapter, changes_something, read_adapter
from .checkpoint import BaseCheckpoint, open_base
from .engine import Engine, Runtime
from .errors import OutputError, PlanError
from .keymap import Rule, parse_map
from .memory import DEFAULT_MAX_MEM, peak_rss
from .output import check_output, default_output
from .plan import build_plan
from .plantypes import MergePlan
from .stream import Run, stream
from .upload import Uploader, model_card

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
    shards_downloaded: int = 0  # Hub base shards fetched by this run
    base_commit: str | None = None  # the Hub commit the base was read at
    pushed_to: str | None = None  # the Hub commit made by --push-to-hub
    files_copied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter directory and its weight in a weighted sum (1.0 for a single adapter)."""

    path: Path
    weight: float = 1.0


def open_inputs(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterSpec | str | os.PathLike[str]],
    *,
    dtype: str = "auto",
    maps: Sequence[str] = (),
    allow_noop: bool = False,
    small_files_dir: Path | None = None,
) -> tuple[MergePlan, hub.HubBase | None]:
    """Open and validate the base and adapters and build the plan, from headers only.

    A Hub base is opened without its shards (their headers are read remotely when not cached);
    the HubBase returned says how to fetch them. ``small_files_dir``: where Hub files go instead
    of the user's cache (--low-disk). To refuse an adapter that changes nothing, its lora_B factors
    are read until a non-zero one is found.
    """
    checkpoint, hub_base = _open_base(base, small_files_dir)
    plan = _plan_for(checkpoint, adapters, dtype=dtype, maps=maps, allow_noop=allow_noop,
                     small_files_dir=small_files_dir)
    return plan, hub_base


def _open_base(base: str | os.PathLike[str], small_files_dir: Path | None) -> tuple[BaseCheckpoint, hub.HubBase | None]:
    hub_base = hub.open_hub_base(str(base), small_files_dir=small_files_dir) if hub.is_repo_id(str(base)) else None
    return (hub_base.checkpoint if hub_base else open_base(Path(base))), hub_base


def _plan_for(checkpoint: BaseCheckpoint, adapters: Sequence[AdapterSpec | str | os.PathLike[str]], *, dtype: str,
              maps: Sequence[str], allow_noop: bool, small_files_dir: Path | None) -> MergePlan:
    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec(Path(a)) for a in adapters]
    if not specs:
        raise PlanError("no adapter given; pass --adapter DIR")
    user_rules: tuple[Rule, ...] = tuple(parse_map(m) for m in maps)
    loaded: list[LoraAdapter] = []
    for spec in specs:
        path, origin = hub.resolve_with_origin(str(spec.path), role="adapter", local_dir=small_files_dir)
        loaded.append(dataclasses.replace(read_adapter(path, weight=spec.weight), origin=origin))
    plan = build_plan(checkpoint, loaded, dtype=dtype, user_rules=user_rules)
    if not allow_noop:
        for adapter in loaded:
            if not changes_something(adapter):
                why = "its weight is 0" if adapter.weight == 0 else (
                    "every lora_B is zero, as PEFT initialises it: was the adapter saved before training?")
                raise PlanError(f"adapter {adapter.path} changes nothing ({why}); "
                                "pass --allow-noop to write an unchanged copy anyway")
    return plan


def load_inputs(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterSpec | str | os.PathLike[str]],
    *,
    dtype: str = "auto",
    maps: Sequence[str] = (),
    allow_noop: bool = False,
) -> MergePlan:
    """The plan over a base whose shards are all local: a Hub repo is resolved whole first."""
    local = hub.resolve(str(base), role="base")
    return open_inputs(local, adapters, dtype=dtype, maps=maps, allow_noop=allow_noop)[0]


def _output_dir(base: str, output: str | os.PathLike[str] | None) -> Path:
    if output is not None:
        return Path(output)
    if hub.is_repo_id(base):  # never beside a snapshot inside the Hub cache
        return Path.cwd() / f"{base.split('@')[0].split('/')[-1]}-merged"
    return default_output(Path(base))


def merge(
    base: str | os.PathLike[str],
    adapters: Sequence[AdapterSpec | str | os.PathLike[str]],
    *,
    output: str | os.PathLike[str] | None = None,
    **options: Any,
) -> MergeReport:
    """Merge LoRA adapters into a safetensors checkpoint, shard by shard, within ``max_mem`` bytes.

    Each touched weight becomes ``W + sum_i w_i * s_i * (B_i @ A_i)`` computed in float32 and
    rounded once to the output dtype (``s = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
    Untouched tensors are copied byte for byte. Raises a StreamMergeError subclass on bad input,
    before anything is written. An interrupted run (signal, full disk, kill) leaves its finished
    shards in ``output/.streammerge-partial``; the same call again resumes from them.

    ``base`` and adapters may be Hub repo ids (``org/name[@rev]``): the base's shards are then
    downloaded one at a time as the merge reaches them (``low_disk``: into a private folder, each
    deleted once merged). ``push_to_hub``: upload the result as one commit with a model card.
    Options: see ``merge_many``.
    """
    return merge_many(base, [(adapters, output)], **options)[0]


def merge_many(
    base: str | os.PathLike[str],
    jobs: Sequence[tuple[Sequence[AdapterSpec | str | os.PathLike[str]], str | os.PathLike[str] | None]],
    *,
    device: str = "auto",
    max_mem: int = DEFAULT_MAX_MEM,
    dtype: str = "auto",
    overwrite: bool = False,
    maps: Sequence[str] = (),
    progress: bool = True,
    checksum: bool = True,
    allow_noop: bool = False,
    low_disk: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    hub_revision: str | None = None,
    hub_api: Any = None,
) -> list[MergeReport]:
    """Several merged checkpoints from one pass over the base: ``jobs`` is a list of (adapters,
    output); each output is what ``merge(base, adapters, output=output)`` would write, and the base
    is read once for all of them, within the same ``max_mem``."""
    started = time.perf_counter()
    runtime = Runtime()  # torch loads in the background while the plan is built
    if push_to_hub and len(jobs) != 1:
        raise OutputError("--push-to-hub takes a single output; push the others in separate runs")
    uploader = Uploader(push_to_hub, private=private, revision=hub_revision, delete_after=low_disk,
                        api=hub_api) if push_to_hub else None
    scratch = Path(tempfile.mkdtemp(prefix="streammerge-")) if low_disk else None  # Hub files, not the cache
    options = {"dtype": dtype, "device": device, "max_mem": max_mem, "maps": list(maps), "checksum": checksum}
    runs: list[Run] = []
    try:
        named = [str(base)] + [str(getattr(a, "path", a)) for adapters, _ in jobs for a in adapters]
        if uploader or any(hub.is_repo_id(n) for n in named):
            hub.progress_bars(progress)
        checkpoint, hub_base = _open_base(base, scratch)
        for adapters, output in jobs:
            plan = _plan_for(checkpoint, adapters, dtype=dtype, maps=maps, allow_noop=allow_noop, small_files_dir=scratch)
            out = _output_dir(str(base), output)
            check_output(out, base=plan.base.root, adapters=[a.path for a in plan.adapters], overwrite=overwrite)
            runs.append(Run(plan, out, MergeReport(str(out), device, max_mem, dtype), options, uploader, low_disk))
        _check_distinct([r.out for r in runs])
        if uploader is not None:
            runs[0].card = _card(str(base), hub_base, runs[0].plan, jobs[0][0], dtype)
        _start_engines(runs, runtime)
        stream(runs, hub_base, progress=progress, checksum=checksum)
    finally:
        if uploader is not None:
            uploader.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    for run in runs:
        report = run.report
        report.adapter_modules = sum(len(a.modules) for a in run.plan.adapters)
        report.seconds = time.perf_counter() - started
        report.peak_rss = peak_rss()
        if hub_base is not None:
            report.base_commit = hub_base.commit
        elif low_disk and uploader is None:
            report.notes.append("--low-disk changed nothing: the base is a local directory, nothing was downloaded")
    return [run.report for run in runs]


def _check_distinct(outs: list[Path]) -> None:
    resolved = [o.resolve() for o in outs]
    for i, a in enumerate(resolved):
        for b in resolved[i + 1:]:
            if a == b or a in b.parents or b in a.parents:
                raise OutputError(f"--output {a} and {b} overlap; give each adapter its own output directory")


def _start_engines(runs: list[Run], runtime: Runtime) -> None:
    """An engine per output, sharing one set of buffers; a missing CUDA device or a refused Hub
    token fails here, before anything is written."""
    report = runs[0].report
    for run in runs:
        run.engine = Engine(run.plan, device=report.device, max_mem=report.max_mem, runtime=runtime)
    engines = [r.engine for r in runs]
    try:
        engines[0].share_buffers(engines[1:])  # type: ignore[union-attr, arg-type]
        if report.device != "cpu":
            engines[0].start_compute()  # type: ignore[union-attr]
        uploader, staging = runs[0].uploader, runs[0].staging
        if uploader is not None:
            uploader.open()
            engines[0].on_shard_done = lambda shard, record: uploader.shard_ready(staging / shard, shard)  # type: ignore[union-attr]
    except BaseException:
        for e in reversed(engines):
            e.close()  # type: ignore[union-attr]
        raise


def _card(base: str, hub_base: hub.HubBase | None, plan: MergePlan,
          adapters: Sequence[AdapterSpec | str | os.PathLike[str]], dtype: str) -> str:
    """The model card; base_model is the base's repo id, or the adapters' base_model_name_or_path."""
    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec(Path(a)) for a in adapters]
    named = [a.config.get("base_model_name_or_path") for a in plan.adapters if isinstance(a.config, dict)]
    base_model = (hub_base.repo if hub_base else
                  next((n for n in named if isinstance(n, str) and hub.parse(n) is not None), None))
    return model_card(base=base, base_model=base_model, base_revision=hub_base.commit if hub_base else None,
                      adapters=[(str(s.path), s.weight) for s in specs], dtype=plan.out_dtype or dtype,
                      tensors_merged=len(plan.touched), shards=len(plan.shards))
