"""Events from the workers to the driver, through one small Ray actor (the relay).

A worker sends its events in batches (``Forwarder``, its merge's listener). A ``shard_done`` waits
until the driver has taken it and said so: the driver's progress is never more than one shard behind
a worker's records, and what a worker has recorded but the driver not yet heard of is at most that
shard. The driver (``pump``) takes what arrived, re-emits it to its own listeners (the bar,
``--progress json``, the caller's ``on_event``) and acknowledges. The relay also counts each
group's or shard's attempts, which is how the report knows the retries.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..errors import ExitCode, Interrupted
from ..events import Event, Events

FORWARDED = ("shard_started", "tensor", "shard_done")  # the worker's own plan / notes / end are the driver's
BATCH_EVENTS = 256
BATCH_SECONDS = 0.25


class Relay:
    """The actor (async: a waiting worker blocks no other)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.sent = 0  # events received so far
        self.taken = 0  # of them, acknowledged by the driver
        self.attempts: dict[str, list[dict[str, Any]]] = {}
        self._changed: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def put(self, events: list[Event], wait: bool) -> None:
        cond = self._cond()
        async with cond:
            self.events.extend(events)
            self.sent += len(events)
            mark = self.sent
            cond.notify_all()
            if wait:
                await cond.wait_for(lambda: self.taken >= mark)

    async def take(self, timeout: float) -> tuple[int, list[Event]]:
        cond = self._cond()
        async with cond:
            if not self.events:
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: bool(self.events)), timeout)
                except asyncio.TimeoutError:
                    pass
            out, self.events = self.events, []
            return self.sent, out

    async def ack(self, upto: int) -> None:
        cond = self._cond()
        async with cond:
            self.taken = max(self.taken, upto)
            cond.notify_all()

    async def attempt(self, key: str, where: dict[str, Any]) -> int:
        self.attempts.setdefault(key, []).append(where)
        return len(self.attempts[key])

    async def all_attempts(self) -> dict[str, list[dict[str, Any]]]:
        return self.attempts


class Forwarder:
    """A worker's listener: its shard and tensor events, in order, to the relay; its shard events
    say which worker (``pid``, ``node``). With the driver gone it stops the merge as interrupted
    (what is recorded stays for the rerun)."""

    def __init__(self, relay: Any, where: dict[str, Any]) -> None:
        self.relay, self.where = relay, {"pid": where["pid"], "node": where["node"]}
        self.batch: list[Event] = []
        self.last = time.monotonic()

    def __call__(self, event: Event) -> None:
        if event.kind not in FORWARDED:
            return
        if event.kind != "tensor":
            event = Event(event.kind, event.output, {**event.data, **self.where}, event.time)
        self.batch.append(event)
        if event.kind == "shard_done":
            self.flush(wait=True)
        elif len(self.batch) >= BATCH_EVENTS or time.monotonic() - self.last > BATCH_SECONDS:
            self.flush(wait=False)

    def flush(self, *, wait: bool = False) -> None:
        import ray

        if self.batch:
            batch, self.batch = self.batch, []
            try:
                ray.get(self.relay.put.remote(batch, wait))
            except ray.exceptions.RayError:
                raise Interrupted("the driver of this run is gone; finished shards are kept: rerun its command to "
                                  "resume", exit_code=ExitCode.ERROR) from None
        self.last = time.monotonic()


def pump(ray: Any, relay: Any, events: Events, timeout: float) -> None:
    """On the driver: what arrived within ``timeout`` seconds, to the driver's listeners, then acked."""
    upto, batch = ray.get(relay.take.remote(timeout))
    for event in batch:
        events.emit(event.kind, event.output, **event.data)
    if batch:
        ray.get(relay.ack.remote(upto))
