"""``--push-to-hub``: the merged checkpoint as one commit (its model card: ``card.py``).

huggingface_hub does the protocol. The repo (and branch) are created before the merge starts, so
a missing token or permission fails in seconds, not after the merge. Each shard is uploaded
(``preupload_lfs_files``) as soon as it is on disk and checksummed, on a background thread;
with ``--low-disk`` it is then deleted. At the end one ``create_commit`` adds the shards already
uploaded, the small files and ``README.md``.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..sources import hub

log = logging.getLogger(__name__)

_REPO = re.compile(rf"^{hub.REPO_ID}$")


def check_repo_id(repo_id: str) -> str:
    if not _REPO.match(repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise OutputError(f"--push-to-hub {repo_id!r}: not a repo id; use ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi()


class Uploader:
    """Uploads finished shards in the background and makes the one commit at the end."""

    def __init__(self, repo_id: str, *, private: bool, revision: str | None, delete_after: bool,
                 api: Any = None) -> None:
        self.repo_id = check_repo_id(repo_id)
        self.private = private
        self.revision = revision
        self.delete_after = delete_after  # --low-disk: a shard is deleted once uploaded
        self.api = api if api is not None else _api()
        self.operations: list[Any] = []
        self.uploaded: list[str] = []
        self._jobs: queue.Queue[tuple[Path, str] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _fail(self, what: str, exc: BaseException) -> OutputError:
        first = (str(exc).strip().splitlines() or [""])[0]
        return OutputError(f"--push-to-hub {self.repo_id}: {what} failed ({type(exc).__name__}: {first}); "
                           "check HF_TOKEN has write access; finished shards are kept: rerun the same command to retry")

    def open(self) -> None:
        """Create the repo (and branch) now, before the merge: fail fast on a token or permission."""
        try:
            self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            if self.revision not in (None, "main"):
                self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        except Exception as exc:
            raise self._fail("creating the repository", exc) from None
        self._thread = threading.Thread(target=self._loop, name="streammerge-upload", daemon=True)
        self._thread.start()

    def shard_ready(self, path: Path, path_in_repo: str) -> None:
        """Queue a finished shard for upload (called from the merge's threads)."""
        self._jobs.put((path, path_in_repo))

    def _loop(self) -> None:
        from huggingface_hub import CommitOperationAdd

        while (job := self._jobs.get()) is not None:
            if self._error is not None:
                continue
            path, name = job
            try:
                op = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                self.api.preupload_lfs_files(self.repo_id, additions=[op], revision=self.revision)
                self.operations.append(op)
                self.uploaded.append(name)
                if self.delete_after:
                    path.unlink()
                log.info("uploaded %s", name)
            except BaseException as exc:
                self._error = self._fail(f"uploading {name}", exc)

    def _wait(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def commit(self, folder: Path, files: Sequence[str], *, message: str) -> str:
        """Wait for the shard uploads, then one commit: those shards plus ``files`` from ``folder``."""
        from huggingface_hub import CommitOperationAdd

        self._wait()
        ops = list(self.operations) + [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f))
                                       for f in files if f not in self.uploaded]
        try:
            info = self.api.create_commit(self.repo_id, operations=ops, commit_message=message,
                                          revision=self.revision)
        except Exception as exc:
            raise self._fail("the commit", exc) from None
        return str(getattr(info, "commit_url", None) or f"{self.repo_id}")

    def close(self) -> None:
        if self._thread is not None:
            self._error = self._error or OutputError("upload stopped")
            self._jobs.put(None)
            self._thread.join(timeout=1)
