"""Writing the outputs: lock, resume, stream the base through the engine(s), finish, publish.

One output: the engine walks the base shard by shard. Several outputs (N adapters -> N merged
checkpoints): one engine per output, walked in lockstep over a single pass of the base. Each base
shard is brought to disk once and opened once per output; each tensor is then merged for every
output that changes it before the next tensor is read, so its bytes are read from the disk once
and from the page cache after that. The engines share one set of chunk buffers (one tensor is
merged at a time, for whichever output), so the memory budget holds for N outputs as for one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import INDEX_NAME
from .engine import Engine, progress_bar
from .errors import DownloadError, Interrupted, OutputError
from .fetch import FETCH_DIR, HOLD, HubShards, LocalShards, SharedShards
from .hub import HubBase
from .manifest import MANIFEST_NAME, build_manifest, reusable_shards, shard_fingerprint, write_json_atomic
from .output import STAGING, aux_files, check_free_space, copy_aux_files, copy_tokenizer, lock_output, publish, write_index
from .plantypes import CONFIG_DTYPE_NAMES, MergePlan
from .upload import CARD_NAME, Uploader

if TYPE_CHECKING:
    from .merge import MergeReport


@dataclass
class Run:
    """One output of a merge call and what writing it needs beyond its plan."""

    plan: MergePlan
    out: Path
    report: MergeReport
    options: dict[str, Any]
    uploader: Uploader | None = None
    low_disk: bool = False
    card: str | None = None
    engine: Engine | None = None
    created: bool = False
    lock: int = -1
    fingerprints: dict[str, str] | None = None

    @property
    def staging(self) -> Path:
        return self.out / STAGING


def finish_output(run: Run, records: dict[str, dict[str, Any]]) -> None:
    """Non-weight files (config changes applied), the tokenizer of a resized vocabulary, the index, the
    model card (when pushing) and the manifest into the staging area; then everything into ``out``
    (the manifest last), or, with --push-to-hub --low-disk, into one Hub commit and nothing kept."""
    plan, staging, report = run.plan, run.staging, run.report
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
    files = report.files_copied + last + [MANIFEST_NAME]
    if run.uploader is not None:  # before publishing: a failed commit leaves a resumable staging area
        report.pushed_to = run.uploader.commit(staging, files, message=message)
        if run.low_disk:  # the shards were deleted once uploaded: nothing to publish here
            shutil.rmtree(staging, ignore_errors=True)
            report.notes.append(f"--low-disk with --push-to-hub: nothing kept in {run.out}; the merge is at "
                                f"{report.pushed_to}")
            return
    publish(staging, run.out, first=list(plan.shards), middle=report.files_copied, last=last + [MANIFEST_NAME])


def _check_disk(runs: list[Run], kept: list[dict[str, dict]], hub_base: HubBase | None) -> None:
    """Free space for the rest of every output, plus the base shards still to download: about two at
    a time with --low-disk (on the first output's disk), all of them in the cache otherwise."""
    needs: dict[int, tuple[Path, int]] = {}

    def add(path: Path, n: int) -> None:
        probe = path if path.exists() else path.parent
        dev = os.stat(probe).st_dev
        first, total = needs.get(dev, (path, 0))
        needs[dev] = (first, total + n)

    for run, done in zip(runs, kept):
        aux = sum((run.plan.base.root / f).stat().st_size for f in aux_files(run.plan.base.root))
        add(run.out, run.plan.output_size - sum(r["size"] for r in done.values()) + aux)
    left = set().union(*(set(run.plan.shards) - set(done) for run, done in zip(runs, kept)))
    missing = [size for s, size in (hub_base.sizes.items() if hub_base else []) if s not in hub_base.cached and s in left]  # type: ignore[union-attr]
    if missing and runs[0].low_disk:
        add(runs[0].out, HOLD * max(missing))
    elif missing:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
        cache.mkdir(parents=True, exist_ok=True)
        add(cache, sum(missing))
    for path, n in needs.values():
        check_free_space(path, n, what="the merged checkpoint" + (" and the base shards to download" if missing else ""))


def stream(runs: list[Run], hub_base: HubBase | None, *, progress: bool, checksum: bool) -> None:
    """Lock every output, resume what is done, merge the rest, finish; on failure keep only what a
    rerun can reuse. ``run.engine`` is set for every run."""
    fetch = (HubShards(hub_base, private=runs[0].staging / FETCH_DIR if runs[0].low_disk else None) if hub_base
             else LocalShards())
    try:
        for run in runs:
            run.created = not run.out.exists()
            run.lock = lock_output(run.staging)
        engines = [run.engine for run in runs]
        assert all(engines)
        for r in runs:
            r.fingerprints = {s: shard_fingerprint(r.plan, s, device=r.report.device, chunk=r.engine.chunk)  # type: ignore[union-attr]
                              for s in r.plan.shards}
        fingerprints = [r.fingerprints for r in runs]
        kept = [reusable_shards(r.staging, f) for r, f in zip(runs, fingerprints)]
        _check_disk(runs, kept, hub_base)
        if len(runs) == 1:
            engines[0].base_shards = fetch  # type: ignore[union-attr]
            engines[0].run(runs[0].staging, runs[0].report, progress=progress, kept=kept[0],  # type: ignore[union-attr]
                           fingerprints=fingerprints[0], checksum=checksum)
        else:
            _lockstep(runs, kept, fingerprints, fetch, progress=progress, checksum=checksum)
        _close(runs, fetch)  # the downloads' private folder goes before the outputs are published
        for run in runs:
            run.report.shards_downloaded = len(fetch.fetched) if isinstance(fetch, HubShards) else 0
            finish_output(run, run.engine.records)  # type: ignore[union-attr]
    except BaseException as exc:
        if isinstance(exc, DownloadError):  # the writers are fine: let them fsync and record what is merged
            for run in runs:
                _drain_quietly(run.engine)
        _close(runs, fetch)  # first: no write may still be pending when files are removed
        for run in runs:
            _clean_after_failure(run, exc)
        raise
    finally:
        for run in runs:
            if run.lock >= 0:
                os.close(run.lock)
            if run.created and run.out.is_dir() and not any(run.out.iterdir()):
                run.out.rmdir()  # failed before any shard, or --push-to-hub --low-disk: all on the Hub


def _close(runs: list[Run], fetch: LocalShards | HubShards) -> None:
    for run in reversed(runs):  # the engine lending its buffers closes last
        if run.engine is not None:
            run.engine.close()
    fetch.close()


def _drain_quietly(engine: Engine | None) -> None:
    try:
        if engine is not None:
            engine.io.drain()
    except Exception:  # the first error stays the one reported
        pass


def _clean_after_failure(run: Run, exc: BaseException) -> None:
    if run.lock < 0:
        return
    engine = run.engine
    resumable = (KeyboardInterrupt, Interrupted, OutputError, DownloadError)
    if isinstance(exc, resumable) and engine and engine.records and run.fingerprints:
        reusable_shards(run.staging, run.fingerprints)  # keep recorded shards only: no partial file stays
    else:
        shutil.rmtree(run.staging, ignore_errors=True)


def _lockstep(runs: list[Run], kept: list[dict[str, dict]], fingerprints: list[dict[str, str]],
              fetch: LocalShards | HubShards, *, progress: bool, checksum: bool) -> None:
    """N outputs in one pass over the base (see the module docstring)."""
    engines: list[Engine] = [run.engine for run in runs]  # type: ignore[misc]
    shared = SharedShards(fetch)
    for e in engines:
        e.base_shards = shared
    with progress_bar(sum(r.plan.output_size for r in runs), progress) as bar:
        todo = [set(e.begin(r.staging, r.report, bar, kept=k, fingerprints=f, checksum=checksum))
                for r, e, k, f in zip(runs, engines, kept, fingerprints)]
        order = [s for s in runs[0].plan.shards if any(s in t for t in todo)]
        for i, shard in enumerate(order):
            users = [e for e, t in zip(engines, todo) if shard in t]
            shared.expect(shard, len(users))
            shared.local(shard)
            if i + 1 < len(order):
                shared.prefetch(order[i + 1])
            for e in users:
                e.open(shard)
            tensors = [{t.name: t for t in e.plan.shards[shard] if t.rewritten} for e in users]
            for name in dict.fromkeys(n for ts in tensors for n in ts):  # each tensor, for every output
                for e, ts in zip(users, tensors):
                    if name in ts:
                        e.rewrite(shard, ts[name])
            for e in users:
                e.finish(shard)
        for e in engines:
            e.drain()
    for e in engines:
        e.end()
