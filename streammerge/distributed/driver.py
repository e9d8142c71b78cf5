"""The driver: plans every output here first (a bad input fails in seconds, and is never retried),
then runs the work on Ray actors and gathers their events and reports.

Two modes (``Ray(shards=...)``):
- a batch: the jobs in groups of ``group``; one task a group runs ``merge_many`` over the whole
  base on one worker, so each output has one writer and its own staging, lock, resume and publish.
- one output spread (``shards=True``): here the lock, the staging area, the free-space check,
  cleanup and the publish; each base shard is one task on some worker, which writes that shard
  and its record only (``output/shardfiles.py``).
A worker (or its node) lost mid-task is restarted and the task run again (``retries``), resuming
from the shards recorded; an error the task itself raises (a full disk, a bad file) is not retried.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api import Planned, plan_outputs, spread_report
from ..errors import ExitCode, Interrupted, OptionValueError, StreamMergeError, UsageError
from ..events import Events
from ..inputs import AdapterSpec
from ..options import MergeOptions
from ..output.manifest import reusable_shards, shard_fingerprint, write_json_atomic
from ..report import MergeReport
from ..sources import hub
from .cluster import Connection, node_local
from .relay import Relay, pump
from .worker import Worker

SUMMARY_FORMAT = "streammerge-ray-summary/1"
PUMP_SECONDS = 0.1


@dataclass(frozen=True)
class Ray:
    """Where ``merge_many`` runs: a Ray cluster. ``address``: ``auto``, ``local`` or ``HOST:PORT``
    (None: the Ray this process joined, else ``auto``). ``group``: outputs a worker writes in one pass
    over the base. ``shards``: spread one output's shards instead. ``summary``: a JSON file written
    last (every output, its node, time, retries, peak memory). ``retries``: how often a lost worker's
    task is run again. ``workers``: at most this many actors (default: as many as the cluster holds)."""

    address: str | None = None
    group: int = 8
    shards: bool = False
    summary: str | os.PathLike[str] | None = None
    retries: int = 3
    workers: int | None = None

    def __post_init__(self) -> None:
        for name in ("group", "retries") + (("workers",) if self.workers is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "retries" else 1):
                raise OptionValueError(f"Ray({name}={value!r}): expected a whole number of at least "
                                       f"{0 if name == 'retries' else 1}")

    def run(self, base: Any, jobs: list[tuple[list[AdapterSpec], Path | None]], opts: MergeOptions,
            events: Events) -> list[MergeReport]:
        started = time.perf_counter()
        planned = plan_outputs(base, jobs, opts)  # before Ray starts: seconds, not minutes
        if self.shards and (len(jobs) != 1 or planned.outputs[0].out.suffix == ".gguf"):
            raise UsageError("--ray-shards spreads the shards of one safetensors output; give one --output directory "
                             "(for many outputs use --batch, for GGUF one machine)")
        base_arg, job_args = _portable(base, jobs, planned)
        options = {**dataclasses.asdict(opts), "progress": False}
        summary: dict[str, Any] = {"format": SUMMARY_FORMAT, "mode": "shards" if self.shards else "batch",
                                   "address": self.address, "outputs": []}
        try:
            with Connection(self.address) as conn:
                pool = _Pool(conn, self, opts, events, base_arg, planned)
                try:
                    reports = (pool.spread(job_args[0], options) if self.shards else pool.batch(job_args, options))
                finally:
                    pool.close()
            summary["outputs"] = [r.to_dict() for r in reports]
            return reports
        except BaseException as exc:
            summary["error"] = str(exc) or type(exc).__name__
            raise
        finally:
            summary["seconds"] = round(time.perf_counter() - started, 3)
            if self.summary is not None:
                write_json_atomic(Path(self.summary), summary)


def _portable(base: Any, jobs: list[tuple[list[AdapterSpec], Path | None]], planned: Planned) -> tuple[
        str, list[tuple[list[AdapterSpec], str]]]:
    """Inputs every node reads the same way: local paths absolute (a filesystem shared at the same
    path), Hub repo ids pinned to the commit the driver planned from (``org/name@commit``)."""
    def portable(p: Any, origin: str | None) -> str:
        if Path(p).exists():
            return str(Path(p).resolve())
        return origin if origin and hub.is_repo_id(str(p)) else str(p)

    out = []
    for (adapters, _), o in zip(jobs, planned.outputs):
        specs = [AdapterSpec(Path(portable(a.path, read.origin)), a.weight) for a, read in zip(adapters, o.plan.adapters)]
        out.append((specs, str(o.out.resolve())))
    return portable(base, planned.outputs[0].plan.base.origin), out


class _Pool:
    """The actors of one run, the relay, and the loop that feeds them work and pumps events."""

    def __init__(self, conn: Connection, how: Ray, opts: MergeOptions, events: Events, base: str,
                 planned: Planned) -> None:
        self.ray, self.conn, self.how, self.opts, self.events = conn.ray, conn, how, opts, events
        self.base, self.planned = base, planned
        self.relay_name = f"streammerge-relay-{uuid.uuid4().hex}"
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(conn.driver_node(), soft=False)  # it lives and dies with the driver
        self.relay = self.ray.remote(num_cpus=0)(Relay).options(name=self.relay_name, scheduling_strategy=here).remote()
        self.actors: list[Any] = []

    def _start(self, wanted: int) -> None:
        gpus = self.opts.device.startswith("cuda")
        capacity = self.conn.capacity(gpus=gpus)
        if capacity < 1:
            raise UsageError(f"--ray: the cluster has no {'GPU' if gpus else 'CPU'} for a worker"
                             + (" (--device cuda asks one GPU a worker)" if gpus else ""))
        n = min(wanted, capacity, self.how.workers or wanted)
        options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if gpus else 0, "memory": self.opts.max_mem,
                                   "max_restarts": self.how.retries, "max_task_retries": self.how.retries}
        if Path(self.base).exists() and node_local(self.base):  # the base's pages are warm here
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.conn.driver_node(), soft=True)
        cls = self.ray.remote(Worker)
        self.actors = [cls.options(**options).remote(self.relay_name) for _ in range(n)]

    def close(self) -> None:
        """The actors and the relay ended now (their CPUs free for the next run at once)."""
        for actor in self.actors + [self.relay]:
            self.ray.kill(actor, no_restart=True)

    def _run(self, items: list[Any], call: Callable[[Any, Any], Any],
             done: Callable[[int, Any], None]) -> tuple[dict[int, Any], list[tuple[int, BaseException]]]:
        """Each item on a free actor, events pumped meanwhile; ``done(index, result)`` as each ends.
        Returns the results by item index, and the errors."""
        ray = self.ray
        free, queue = list(self.actors), list(range(len(items)))
        pending: dict[Any, tuple[Any, int]] = {}
        results: dict[int, Any] = {}
        errors: list[tuple[int, BaseException]] = []
        while queue or pending:
            while queue and free:
                actor, i = free.pop(0), queue.pop(0)
                pending[call(actor, items[i])] = (actor, i)
            pump(ray, self.relay, self.events, PUMP_SECONDS)
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                actor, i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                    free.append(actor)
                    done(i, results[i])
                except ray.exceptions.RayTaskError as exc:  # raised by the task: not retried
                    errors.append((i, _cause(exc)))
                    free.append(actor)
                except ray.exceptions.RayError as exc:  # the worker lost more often than retried
                    errors.append((i, Interrupted(f"a worker was lost {self.how.retries + 1} times ({exc}); what "
                                                  "it finished is kept: rerun the same command to resume",
                                                  exit_code=ExitCode.ERROR)))
            if queue and not free and not pending:
                errors += [(i, Interrupted("no worker left on the cluster; rerun the same command to resume",
                                           exit_code=ExitCode.ERROR)) for i in queue]
                queue = []
        pump(ray, self.relay, self.events, 0)
        return results, errors

    def _attempts(self) -> dict[str, list[dict[str, Any]]]:
        return dict(self.ray.get(self.relay.all_attempts.remote()))

    def _plan_event(self, kept: dict[str, list[str]]) -> None:
        p = self.planned
        total = sum(o.plan.output_size for o in p.outputs)
        done = sum(o.plan.shard_bytes(s) for o in p.outputs for s in kept.get(str(o.out), []))
        self.events.emit("plan", bytes=total, bytes_done=done, bytes_out=total - done,
                         outputs=[str(o.out) for o in p.outputs], shards=len(p.outputs[0].plan.shards),
                         resumed=kept)

    # --- a batch: groups of outputs, one merge_many each
    def batch(self, jobs: list[tuple[list[AdapterSpec], str]], options: dict[str, Any]) -> list[MergeReport]:
        size = self.how.group
        groups = [jobs[i:i + size] for i in range(0, len(jobs), size)]
        self._plan_event({str(s.out): sorted(s.kept) for s in self.planned.sinks if getattr(s, "kept", None)})
        self._start(len(groups))
        keys = [f"group {i}" for i in range(len(groups))]
        reports: list[MergeReport] = []

        def done(g: int, result: dict[str, Any]) -> None:  # each output's line as its group publishes it
            tried = self._attempts().get(keys[g], [])
            for doc in result["reports"]:
                report = MergeReport(**doc)
                report.cluster = {"node": result["node"], "host": result["host"], "pid": result["pid"],
                                  "retries": max(len(tried) - 1, 0), "attempts": tried, "group": g}
                self.events.emit("output_done", report.output, node=result["node"], host=result["host"],
                                 seconds=report.seconds, retries=report.cluster["retries"])
                reports.append(report)

        _, errors = self._run(list(range(len(groups))), lambda actor, g: actor.merge_group.remote(
            keys[g], self.base, groups[g], options), done)
        _raise_first(errors, [", ".join(out for _, out in groups[g]) for g, _ in errors])
        order = {out: i for i, (_, out) in enumerate(jobs)}
        return sorted(reports, key=lambda r: order.get(r.output, len(order)))

    # --- one output, its shards spread
    def spread(self, job: tuple[list[AdapterSpec], str], options: dict[str, Any]) -> list[MergeReport]:
        started = time.perf_counter()
        adapters, output = job
        sink, plan = self.planned.sinks[0], self.planned.outputs[0].plan
        self._start(len(plan.shards))
        kind = self.ray.get(self.actors[0].device_kind.remote(self.opts.device))
        chunk = self.planned.working_set.chunk_elements
        fingerprint = lambda shard: shard_fingerprint(plan, shard, device=kind, chunk=chunk)  # noqa: E731
        try:
            kept = sink.prepare(fingerprint)  # the lock, and what an earlier run finished
            self._plan_event({output: sorted(kept)})
            todo = [s for s in plan.shards if s not in kept]
            results, errors = self._run(todo, lambda actor, shard: actor.merge_shards.remote(
                f"shard {shard}", self.base, adapters, output, [shard], options), lambda i, result: None)
            _raise_first(errors, [todo[i] for i, _ in errors])
            sink.records = reusable_shards(sink.staging, list(plan.shards), fingerprint)
            missing = [s for s in plan.shards if s not in sink.records]
            if missing:
                raise Interrupted(f"{output}: shard(s) {', '.join(missing[:3])} have no record after their task; "
                                  "rerun the same command to redo them", exit_code=ExitCode.ERROR)
            sink.drain()  # (a kept shard an earlier run had not hashed)
            sink.finish()
        except BaseException as exc:
            sink.fail(exc)
            raise
        finally:
            sink.close()
        attempts = self._attempts()
        by_shard = {todo[i]: r for i, r in results.items()}
        done = list(by_shard.values())
        report = spread_report(self.planned, sink, self.opts, device=done[0]["device"] if done else kind,
                               baseline_rss=0, peak_gpu=max((r["peak_gpu"] or 0 for r in done), default=None) or None,
                               seconds=time.perf_counter() - started)
        report.peak_rss = max((r["peak_rss"] for r in done), default=0)
        nodes = sorted({r["node"] for r in done})
        retries = sum(max(len(a) - 1, 0) for a in attempts.values())
        report.cluster = {"nodes": nodes, "retries": retries, "shards": {
            s: {"node": r["node"], "host": r["host"], "seconds": round(r["seconds"], 3), "attempts": len(
                attempts.get(f"shard {s}", []))} for s, r in by_shard.items()}}
        self.events.emit("output_done", output, node=",".join(nodes), seconds=report.seconds, retries=retries)
        return [report]


def _cause(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _raise_first(errors: list[tuple[int, BaseException]], what: list[str]) -> None:
    """After every task has ended: the first error, naming what failed (the rest are done)."""
    if not errors:
        return
    first = errors[0][1]
    if isinstance(first, StreamMergeError):
        if len(errors) > 1:
            first.args = (f"{first} ({len(errors)} tasks failed: {'; '.join(what)})",) + first.args[1:]
        raise first
    raise Interrupted(f"{what[0]}: {type(first).__name__}: {first}; rerun the same command to resume",
                      exit_code=ExitCode.ERROR) from first
