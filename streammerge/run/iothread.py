"""One background thread that performs writes, copies and fsyncs in the order they were submitted.

The merge thread reads and computes chunk k while this thread writes chunk k-1, copies untouched
tensors in the kernel and fsyncs finished shards. The syscalls release the GIL, so the two overlap.
An error in this thread is raised in the merge thread at its next submit, wait or drain.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class IOThread:
    def __init__(self, *, depth: int = 16) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], object], Callable[[], None] | None] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._loop, name="streammerge-io", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                fn, done = job
                if self._error is None and not self._cancelled:
                    try:
                        fn()
                    except BaseException as exc:  # handed to the merge thread, never lost
                        self._error = exc
                if done is not None:
                    done()
            finally:
                self._jobs.task_done()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[[], object], *, done: Callable[[], None] | None = None) -> None:
        """Queue ``fn``; ``done`` runs after it even when it fails or is cancelled."""
        self.check()
        self._jobs.put((fn, done))

    def drain(self) -> None:
        """Wait for every queued job; raise the first error any of them hit."""
        self._jobs.join()
        self.check()

    def stop(self) -> None:
        """Skip what is still queued and end the thread (used on failure and at the end)."""
        self._cancelled = True
        self._jobs.put(None)
        self._thread.join()
