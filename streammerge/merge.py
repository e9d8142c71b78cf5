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
import tempfile
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
from .fetch import FETCH_DIR, HOLD, HubShards
from .memory import DEFAULT_MAX_MEM, peak_rss
from .upload import CARD_NAME, Uploader, model_card
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
    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec(Path(a)) for a in adapters]
    if not specs:
        raise PlanError("no adapter given; pass --adapter DIR")
    user_rules: tuple[Rule, ...] = tuple(parse_map(m) for m in maps)
    hub_base = hub.open_hub_base(str(base), small_files_dir=small_files_dir) if hub.is_repo_id(str(base)) else None
    checkpoint = hub_base.checkpoint if hub_base else open_base(Path(base))
    specs = [AdapterSpec(hub.resolve(str(s.path), role="adapter", local_dir=small_files_dir), s.weight) for s in specs]
    loaded: list[LoraAdapter] = [read_adapter(s.path, weight=s.weight) for s in specs]
    plan = build_plan(checkpoint, loaded, dtype=dtype, user_rules=user_rules)
    if not allow_noop:
        for adapter in loaded:
            if not changes_something(adapter):
                why = "its weight is 0" if adapter.weight == 0 else (
                    "every lora_B is zero, as PEFT initialises it: was the adapter saved before training?")
                raise PlanError(f"adapter {adapter.path} changes nothing ({why}); "
                                "pass --allow-noop to write an unchanged copy anyway")
    return plan, hub_base


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


@dataclass
class _Run:
    """What one merge() call works with, beyond the plan."""

    out: Path
    report: MergeReport
    options: dict[str, Any]
    hub_base: hub.HubBase | None = None
    uploader: Uploader | None = None
    low_disk: bool = False
    card: str | None = None

    @property
    def staging(self) -> Path:
        return self.out / STAGING


def _finish_output(plan: MergePlan, run: _Run, records: dict[str, dict[str, Any]]) -> None:
    """Non-weight files (config changes applied), the tokenizer of a resized vocabulary, the index, the
    model card (when pushing) and the manifest into the staging area; then everything into ``out``
    (the manifest last), or, with --push-to-hub --low-disk, into one Hub commit and nothing kept."""
    staging, report = run.staging, run.report
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
    if run.card is not None:
        (staging / CARD_NAME).write_text(run.card, encoding="utf-8")
        report.files_copied = sorted(set(report.files_copied) | {CARD_NAME})
    last = [INDEX_NAME] if plan.base.sharded else []
    if plan.base.sharded:
        write_index(staging, plan.base, plan.weight_map, plan.output_size)
    write_json_atomic(staging / MANIFEST_NAME, build_manifest(plan, records, run.options))
    message = f"Merge {len(plan.adapters)} LoRA adapter(s) into {plan.base.origin or plan.base.root.name} (streammerge)"
    if run.uploader is not None and run.low_disk:  # the shards are on the Hub already, not here
        report.pushed_to = run.uploader.commit(staging, report.files_copied + last + [MANIFEST_NAME], message=message)
        shutil.rmtree(staging, ignore_errors=True)
        report.notes.append(f"--low-disk with --push-to-hub: nothing kept in {run.out}; the merge is at {report.pushed_to}")
        return
    publish(staging, run.out, first=list(plan.shards), middle=report.files_copied, last=last + [MANIFEST_NAME])
    if run.uploader is not None:
        report.pushed_to = run.uploader.commit(run.out, report.files_copied + last + [MANIFEST_NAME], message=message)


def _check_disk(plan: MergePlan, run: _Run, kept: dict[str, dict]) -> None:
    """Free space for the rest of the output, plus the base shards still to download: about two at a
    time with --low-disk (on the output's disk), all of them in the cache otherwise."""
    need = plan.output_size - sum(r["size"] for r in kept.values())
    need += sum((plan.base.root / f).stat().st_size for f in aux_files(plan.base.root))
    missing = [size for s, size in (run.hub_base.sizes.items() if run.hub_base else [])
               if s not in run.hub_base.cached and s not in kept]  # type: ignore[union-attr]
    if run.low_disk:
        need += HOLD * max(missing, default=0)
    elif missing:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
        cache.mkdir(parents=True, exist_ok=True)
        probe = run.out if run.out.exists() else run.out.parent
        if os.stat(cache).st_dev == os.stat(probe).st_dev:
            need += sum(missing)
        else:
            check_free_space(cache, sum(missing), what="the base shards to download into the Hub cache")
    check_free_space(run.out, need)


def _stream(plan: MergePlan, run: _Run, engine: Engine, *, progress: bool, checksum: bool) -> None:
    """Lock the output, resume what is done, merge the rest, finish; on failure keep only what a
    rerun can reuse."""
    staging, out, report = run.staging, run.out, run.report
    fingerprints = {s: shard_fingerprint(plan, s, device=report.device, chunk=engine.chunk) for s in plan.shards}
    created = not out.exists()
    lock = lock_output(staging)
    try:
        kept = reusable_shards(staging, fingerprints)
        _check_disk(plan, run, kept)
        engine.run(staging, report, progress=progress, kept=kept, fingerprints=fingerprints, checksum=checksum)
        engine.close()  # the downloads' private folder goes before the output is published
        _finish_output(plan, run, engine.records)
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
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # --push-to-hub --low-disk: everything went to the Hub


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
    """
    started = time.perf_counter()
    runtime = Runtime()  # torch loads in the background while the plan is built
    uploader = Uploader(push_to_hub, private=private, revision=hub_revision, delete_after=low_disk,
                        api=hub_api) if push_to_hub else None
    scratch = Path(tempfile.mkdtemp(prefix="streammerge-")) if low_disk else None  # Hub files, not the cache
    try:
        if not progress and (hub.is_repo_id(str(base)) or uploader):
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        plan, hub_base = open_inputs(base, adapters, dtype=dtype, maps=maps, allow_noop=allow_noop,
                                     small_files_dir=scratch)
        out = _output_dir(str(base), output)
        check_output(out, base=plan.base.root, adapters=[a.path for a in plan.adapters], overwrite=overwrite)
        options = {"dtype": dtype, "device": device, "max_mem": max_mem, "maps": list(maps), "checksum": checksum}
        run = _Run(out, MergeReport(str(out), device, max_mem, dtype), options, hub_base, uploader, low_disk)
        if uploader is not None:
            run.card = _card(str(base), hub_base, plan, adapters, dtype)
        _merge_with_engine(plan, run, runtime, progress=progress, checksum=checksum)
    finally:
        if uploader is not None:
            uploader.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    report = run.report
    report.adapter_modules = sum(len(a.modules) for a in plan.adapters)
    report.seconds = time.perf_counter() - started
    report.peak_rss = peak_rss()
    return report


def _merge_with_engine(plan: MergePlan, run: _Run, runtime: Runtime, *, progress: bool, checksum: bool) -> None:
    report = run.report
    fetch = HubShards(run.hub_base, private=run.staging / FETCH_DIR if run.low_disk else None) if run.hub_base else None
    uploader = run.uploader
    on_done = (lambda shard, record: uploader.shard_ready(run.staging / shard, shard)) if uploader else None
    engine = Engine(plan, device=report.device, max_mem=report.max_mem, runtime=runtime, shards=fetch,
                    on_shard_done=on_done)
    try:
        if report.device != "cpu":
            engine.start_compute()  # a missing CUDA device is refused before anything is written
        if uploader is not None:
            uploader.open()  # a missing token or permission is refused before anything is written
    except BaseException:
        engine.close()
        raise
    _stream(plan, run, engine, progress=progress, checksum=checksum)
    if fetch is not None:
        report.shards_downloaded = len(fetch.fetched)
        report.base_commit = run.hub_base.commit  # type: ignore[union-attr]


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
