"""Free disk space for a whole run, checked before the first write."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..sources.fetch import HOLD
from ..sources.hub import HubBase
from ..plan.types import MergePlan
from .directory import check_free_space, check_output
from .files import aux_files
from .sink import Sink


def check_disk(sinks: list[Sink], hub_base: HubBase | None, *, low_disk: bool) -> None:
    """Free space for the rest of every output, plus the base shards still to download: about two at
    a time with --low-disk (on the first output's disk), all of them in the cache otherwise."""
    needs: dict[int, tuple[Path, int]] = {}

    def add(path: Path, n: int) -> None:
        probe = path if path.exists() else path.parent
        dev = os.stat(probe).st_dev
        first, total = needs.get(dev, (path, 0))
        needs[dev] = (first, total + n)

    for sink in sinks:
        add(sink.out, sink.bytes_to_write() + sink.extra_bytes())
    left = set().union(*(set(s.plan.shards) - set(s.kept) for s in sinks))
    missing = [size for s, size in hub_base.sizes.items() if s not in hub_base.cached and s in left] if hub_base else []
    if missing and low_disk:
        add(sinks[0].out, HOLD * max(missing))
    elif missing:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
        cache.mkdir(parents=True, exist_ok=True)
        add(cache, sum(missing))
    for path, n in needs.values():
        check_free_space(path, n, what="the merged checkpoint" + (" and the base shards to download" if missing else ""))


def check_output_space(out: Path, plan: MergePlan, *, overwrite: bool) -> dict[str, object]:
    """``plan --output``: the output directory checked as a merge would check it (allowed, empty or
    --overwrite, enough free space for the checkpoint and its files)."""
    check_output(out, base=plan.base.root, adapters=[a.path for a in plan.adapters], overwrite=overwrite)
    base = plan.base.root
    need = plan.output_size + sum((base / f).stat().st_size for f in aux_files(base))
    probe = out if out.exists() else out.parent
    while not probe.exists():
        probe = probe.parent
    check_free_space(probe, need)
    return {"path": str(out), "free_bytes": shutil.disk_usage(probe).free, "needed_bytes": need}
