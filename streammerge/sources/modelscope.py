"""Inputs named ``modelscope:org/name[@revision]``, through the ``modelscope`` package (an optional
extra: ``pip install streammerge[modelscope]``), with its cache (``MODELSCOPE_CACHE``, default
``~/.cache/modelscope``) and token (``MODELSCOPE_API_TOKEN``) as it uses them.

The cache is tried first (no network); a repo not cached is downloaded through the package.
What ModelScope's API does not allow: the package reads files only whole (no ranged reads), so a
shard's header is known only once the shard is on disk. A ModelScope base is therefore brought
into the cache first, then planned from its headers before any output is written, and merged shard
by shard from the cache; ``--low-disk`` (delete each shard once merged) is refused for it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import InputError, UsageError
from .hub import REPO_ID

PREFIX = "modelscope:"
_ID = re.compile(rf"^{PREFIX}(?P<repo>{REPO_ID})(?:@(?P<rev>[\w./-]+))?$")


def parse(text: str) -> tuple[str, str | None] | None:
    """``(repo, revision)`` for ``modelscope:org/name[@rev]``."""
    match = _ID.match(text)
    return (match["repo"], match["rev"]) if match else None


def is_modelscope_id(text: str) -> bool:
    return parse(text) is not None


def resolve(text: str, *, role: str, low_disk: bool = False) -> tuple[Path, str]:
    """The local snapshot of a ModelScope repo and its origin ``modelscope:org/name@revision``."""
    parsed = parse(text)
    if parsed is None:
        raise InputError(f"{role} {text}: not a ModelScope id; write modelscope:ORG/NAME[@REVISION]")
    if low_disk and role == "base":
        raise UsageError(f"--low-disk with base {text}: the modelscope package reads files only whole, so a "
                         "ModelScope base is brought into its cache before the plan; drop --low-disk")
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise InputError(f"{role} {text}: the modelscope package is not installed; pip install "
                         "'streammerge[modelscope]'") from None
    repo, revision = parsed
    for name in ("modelscope", "modelscope_hub"):  # its retries and notices would be more lines on stderr
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        path = Path(snapshot_download(repo, revision=revision, local_files_only=True))  # the cache, no network
    except Exception:
        try:
            path = Path(snapshot_download(repo, revision=revision))
        except Exception as exc:  # the package's errors come in many types (HTTP, cache, auth)
            first = (str(exc).strip().splitlines() or [""])[0]
            raise InputError(f"{role} {text}: not in the ModelScope cache and cannot be downloaded "
                             f"({type(exc).__name__}: {first}); check the id, MODELSCOPE_CACHE and "
                             "MODELSCOPE_API_TOKEN") from None
    return path, f"{PREFIX}{repo}@{revision or path.name}"
