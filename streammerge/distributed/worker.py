"""The worker: a Ray actor (one a GPU, or one a CPU core) kept for the whole run, so that torch
and CUDA start once. It runs the same API as a local merge: a group of a batch is ``merge_many``
(its own staging, lock, resume and publish), a spread merge's shard is ``merge_shards``."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from .relay import Forwarder


class Worker:
    def __init__(self, relay: str) -> None:
        import ray

        self.relay = ray.get_actor(relay)  # (by name: a restarted worker finds it again)

    def where(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {"node": str(context.get_node_id()), "host": socket.gethostname(), "pid": os.getpid()}

    def device_kind(self, device: str) -> str:
        """What the resume fingerprints record (``cpu`` or ``cuda``), as this worker resolves --device."""
        from ..run.device import resolve_device

        return str(resolve_device(device).type)

    def merge_group(self, key: str, base: str, jobs: list[tuple[list[Any], str]], options: dict[str, Any]) -> dict[str, Any]:
        from ..api import merge_many

        return self._attempt(key, lambda forward: {
            "reports": [r.to_dict() for r in merge_many(base, jobs, on_event=forward, **options)]})

    def merge_shards(self, key: str, base: str, adapters: list[Any], output: str, shards: list[str],
                     options: dict[str, Any]) -> dict[str, Any]:
        from ..api import merge_shards

        return self._attempt(key, lambda forward: merge_shards(base, adapters, output, shards, on_event=forward,
                                                               **options))

    def _attempt(self, key: str, work: Callable[[Forwarder], dict[str, Any]]) -> dict[str, Any]:
        """One attempt at ``key``, counted by the relay, its events forwarded; the result and where it ran."""
        import ray

        where = self.where()
        ray.get(self.relay.attempt.remote(key, where))
        forward = Forwarder(self.relay, where)
        result = work(forward)
        forward.flush()
        return {**where, **result}
