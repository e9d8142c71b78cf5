"""Base shards brought to local files when the merge needs them.

A local base needs nothing (``LocalShards``). A Hub base (``HubShards``) downloads each shard just
before it is merged, with the next one downloading in the background meanwhile, so at most
``HOLD`` shards are on disk or in flight at once. Normally they go through the user's cache, where
they stay; with ``--low-disk`` they go to a private folder inside the output's staging area and are
deleted once their merged shard is on disk, so the disk needed is the output plus about two shards.
A shard already in the cache is read there and never deleted.

Every fetched file's own header must equal the one the plan was built from (read remotely).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..formats.checkpoint import BaseCheckpoint
from ..errors import DownloadError, InputError
from ..formats.header import read_header
from .hub import HubBase, hub_errors

log = logging.getLogger(__name__)

HOLD = 2  # the shard being merged and the next one
FETCH_DIR = "base-shards"  # inside the output's staging area (--low-disk)


class LocalShards:
    """A base on local disk: every shard is already there."""

    def prefetch(self, shard: str) -> None:
        pass

    def local(self, shard: str) -> None:
        pass

    def release(self, shard: str) -> None:
        pass

    def close(self) -> None:
        pass


class HubShards:
    def __init__(self, hub: HubBase, *, private: Path | None) -> None:
        self.hub = hub
        self.base: BaseCheckpoint = hub.checkpoint
        self.private = private  # --low-disk: download here, delete after use; None: the user's cache
        self.fetched: list[str] = []  # shards downloaded by this run, in order
        self._paths: dict[str, Path] = {}
        self._errors: dict[str, BaseException] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._held: set[str] = set()  # downloading or downloaded, not yet released
        self._lock = threading.Condition()

    def prefetch(self, shard: str) -> None:
        """Start downloading ``shard`` in the background if it is not here and a place is free."""
        with self._lock:
            if shard in self.hub.cached or shard in self._threads or len(self._held) >= HOLD:
                return
            self._start(shard)

    def _start(self, shard: str) -> None:
        self._held.add(shard)
        thread = threading.Thread(target=self._download, args=(shard,), name=f"streammerge-fetch-{shard}", daemon=True)
        self._threads[shard] = thread
        thread.start()

    def _download(self, shard: str) -> None:
        from huggingface_hub import hf_hub_download

        log.info("downloading %s from %s", shard, self.hub.repo)
        try:
            with hub_errors(f"base {self.hub.repo}@{self.hub.commit[:12]}: shard {shard}"):
                path = hf_hub_download(self.hub.repo, shard, revision=self.hub.commit,
                                       local_dir=self.private)
            self._paths[shard] = Path(path)
            self.fetched.append(shard)
        except InputError as exc:  # raised in the merge thread by local()
            self._errors[shard] = DownloadError(f"{exc}; shards merged so far are kept: rerun the same command to resume")
        except BaseException as exc:
            self._errors[shard] = exc

    def local(self, shard: str) -> None:
        """Block until ``shard`` is a local file; then check its header against the plan's and point
        the plan at it."""
        if shard in self.hub.cached:
            return
        with self._lock:
            if shard not in self._threads:
                self._lock.wait_for(lambda: len(self._held) < HOLD)
                self._start(shard)
        self._threads[shard].join()
        if shard in self._errors:
            raise self._errors[shard]
        path = self._paths[shard]
        header, planned = read_header(path), self.base.shards[shard]
        if header.tensors != planned.tensors or header.metadata != planned.metadata:
            raise InputError(f"base {self.hub.repo}: {shard} as downloaded does not match the header the plan was "
                             f"built from (the repository changed at commit {self.hub.commit}?); rerun")
        self.base.shards[shard] = header

    def release(self, shard: str) -> None:
        """The merged shard is on disk: with --low-disk, delete the downloaded base shard."""
        with self._lock:
            if shard not in self._held:
                return
            self._held.discard(shard)
            if self.private is not None and shard in self._paths:
                self._paths[shard].unlink(missing_ok=True)
            self._lock.notify_all()

    def close(self) -> None:
        """Stop waiting for downloads (their daemon threads end with the process) and, with
        --low-disk, delete what was downloaded."""
        if self.private is not None:
            for shard in list(self._held):
                if shard in self._paths:
                    self._paths[shard].unlink(missing_ok=True)
        self._held.clear()


class SharedShards:
    """One shard source for several outputs written in one pass: a shard is released once every
    output that needs it has written its own merged copy (releases come from several I/O threads)."""

    def __init__(self, inner: LocalShards | HubShards) -> None:
        self.inner = inner
        self._users: dict[str, int] = {}
        self._lock = threading.Lock()

    def expect(self, shard: str, users: int) -> None:
        self._users[shard] = users

    def prefetch(self, shard: str) -> None:
        self.inner.prefetch(shard)

    def local(self, shard: str) -> None:
        self.inner.local(shard)

    def release(self, shard: str) -> None:
        with self._lock:
            self._users[shard] = self._users.get(shard, 1) - 1
            last = self._users[shard] <= 0
        if last:
            self.inner.release(shard)
