"""What happens during a merge, as events; the progress bar, ``--progress json``, the web UI and a
cluster driver are all listeners.

Kinds, in order: ``plan`` (outputs, shards, bytes), then per output and shard ``shard_started`` /
``tensor`` (name, kind, bytes) / ``shard_done`` (bytes), then ``note`` (text: each warning and note
of the reports), and last ``finished`` (the reports) or ``failed`` (error, exit_code). On a cluster
(``distributed``) the shard events carry the worker's ``pid`` and ``node``, and each output's end is
``output_done`` (node, host, seconds, retries). Listeners run on the thread that emits
(the merge thread, or an I/O thread for ``shard_done``) and must be quick.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

@dataclass(frozen=True)
class Event:
    kind: str
    output: str | None = None  # the output directory it concerns (None: the whole run)
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, "output": self.output, "time": round(self.time, 3), **self.data}


Listener = Callable[[Event], None]


class Events:
    """Fan-out of events to listeners, from any thread."""

    def __init__(self, listeners: list[Listener] | None = None) -> None:
        self._listeners: list[Listener] = list(listeners or [])
        self._lock = threading.Lock()

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, output: str | None = None, /, **data: Any) -> None:
        event = Event(kind, output, data)
        with self._lock:
            for listener in self._listeners:
                listener(event)


class JsonLines:
    """``--progress json``: every event as one JSON object a line (on stderr by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def __call__(self, event: Event) -> None:
        out = self.stream or sys.stderr
        out.write(json.dumps(event.to_dict(), default=str) + "\n")
        out.flush()


class ProgressBar:
    """One tqdm bar over the bytes of every output, on stderr and only on a terminal. tqdm labels its
    scaled units kB, MB, GB (and MB/s), so it scales by powers of 1000 to match its labels."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        if event.kind == "plan":
            from tqdm import tqdm

            self._bar = tqdm(total=event.data["bytes"], unit="B", unit_scale=True, unit_divisor=1000,
                             desc="merging", file=sys.stderr, disable=not sys.stderr.isatty())
            self._bar.update(event.data.get("bytes_done", 0))
        elif event.kind == "tensor" and self._bar is not None:
            self._bar.update(event.data["bytes"])
        elif event.kind in ("finished", "failed") and self._bar is not None:
            self._bar.close()
            self._bar = None
