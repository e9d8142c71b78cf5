"""Inputs named by a Hugging Face Hub repo id: ``org/name`` or ``org/name@revision``.

huggingface_hub is the client: its cache layout (``models--org--name/snapshots/<rev>``), token,
endpoint and offline mode (``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``) apply unchanged. A local directory always wins over a repo id of the same text.

A base repo is opened without its weights: 1. the revision is pinned to a commit; 2. the small
files (config, index, tokenizer) are downloaded; 3. each shard header is read from the cache when
the shard is cached, else remotely (a ranged request, huggingface_hub's
``parse_safetensors_file_metadata``). The plan is built from those; the shards themselves are
fetched one at a time while the merge runs (see ``fetch.py``). Adapters are small and are resolved
whole.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.checkpoint import BaseCheckpoint, open_base
from ..errors import InputError
from ..formats.header import SafetensorsHeader, planned_header, read_header

REPO_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"  # org/name
_REPO = re.compile(rf"^(?P<repo>{REPO_ID})(?:@(?P<rev>[\w./-]+))?$")
# Weights of any format are never fetched with the small files; safetensors shards come one by one.
WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack",
                   "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.npz", "*.mlmodel"]


def parse(text: str) -> tuple[str, str | None] | None:
    """``(repo, revision)`` when ``text`` is a repo id and not an existing local path."""
    match = _REPO.match(text)
    if Path(text).exists() or match is None:
        return None
    return match["repo"], match["rev"]


def is_repo_id(text: str) -> bool:
    return parse(text) is not None


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def progress_bars(show: bool) -> None:
    """huggingface_hub's download/upload bars follow streammerge's: on stderr, only on a terminal."""
    import sys

    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if show and sys.stderr.isatty() else disable_progress_bars)()


@contextlib.contextmanager
def hub_errors(where: str, revision: str | None = None) -> Iterator[None]:
    """huggingface_hub's errors as one line each: what, where, the fix."""
    from huggingface_hub import errors as hf

    try:
        yield
    except hf.GatedRepoError:
        raise InputError(f"{where}: the repository is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except hf.RepositoryNotFoundError:
        raise InputError(f"{where}: repository not found (or private: set HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise InputError(f"{where}: revision {revision!r} not found") from None
    except hf.LocalEntryNotFoundError:
        raise InputError(f"{where}: not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE is set, "
                         "or no network); download it first or pass a local directory") from None
    except hf.EntryNotFoundError as exc:
        raise InputError(f"{where}: a file is missing from the repository ({str(exc).splitlines()[0] if str(exc) else ''})") from None
    except (hf.HfHubHTTPError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"{where}: cannot fetch from the Hub ({type(exc).__name__}: {first})") from None


def _tried_both(role: str, text: str) -> str:
    """Where a Hub error happened, for a name that is no local directory but is a valid repo id."""
    return f"{role} {text}: no such local directory, and as a Hub repo id"


def resolve(text: str, *, role: str, local_dir: Path | None = None) -> Path:
    """A local directory as given, or the local snapshot of a whole Hub repo (adapters, verify).
    With ``local_dir`` the files go there instead of the cache (``--low-disk``)."""
    return resolve_with_origin(text, role=role, local_dir=local_dir)[0]


def resolve_with_origin(text: str, *, role: str, local_dir: Path | None = None) -> tuple[Path, str | None]:
    """``resolve``, and for a repo id its origin ``org/name@commit`` (None for a local directory)."""
    parsed = parse(text)
    if parsed is None:
        return Path(text), None
    from huggingface_hub import HfApi, snapshot_download

    repo, revision = parsed
    with hub_errors(_tried_both(role, text), revision):
        if local_dir is not None and not offline():  # pinned to a commit first: no ref is written in the cache
            commit = HfApi().repo_info(repo, revision=revision).sha or ""
            where = local_dir / repo.replace("/", "--")
            return Path(snapshot_download(repo, revision=commit, local_dir=where)), f"{repo}@{commit}"
        snapshot = Path(snapshot_download(repo, revision=revision))
        return snapshot, f"{repo}@{snapshot.name}"


@dataclass
class HubBase:
    """A base checkpoint on the Hub: the plan's view of it and what fetching its shards needs."""

    repo: str
    commit: str
    checkpoint: BaseCheckpoint
    cached: dict[str, Path]  # shards already in the user's cache (read there, never deleted)
    sizes: dict[str, int]  # shard file sizes, for the disk-space check


def open_hub_base(text: str, *, small_files_dir: Path | None) -> HubBase:
    """Plan-ready view of a base repo with no shard downloaded. ``small_files_dir``: where the small
    files go instead of the cache (``--low-disk``: the cache is not touched)."""
    from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache

    parsed = parse(text)
    assert parsed is not None
    repo, revision = parsed
    where = _tried_both("base", text)
    api = HfApi()
    with hub_errors(where, revision):
        if offline() or small_files_dir is None:  # 1.+2. through the cache: the folder name is the commit
            root = Path(snapshot_download(repo, revision=revision, ignore_patterns=WEIGHT_PATTERNS))
            commit = root.name
        else:
            commit = api.repo_info(repo, revision=revision).sha or ""
            root = Path(snapshot_download(repo, revision=commit, ignore_patterns=WEIGHT_PATTERNS,
                                          local_dir=small_files_dir / repo.replace("/", "--")))
        listing = _listing(api, repo, commit, root)
    cached: dict[str, Path] = {}

    def read_shard(name: str) -> SafetensorsHeader:  # 3.
        hit = try_to_load_from_cache(repo, name, revision=commit)
        if isinstance(hit, str):
            cached[name] = Path(hit)
            return read_header(Path(hit))
        if offline():
            raise InputError(f"{where}: shard {name} is not in the local cache and HF_HUB_OFFLINE is set; "
                             "download it first or unset HF_HUB_OFFLINE")
        if name not in listing:
            raise InputError(f"{where}: shard {name} listed in the index is missing from the repository")
        with hub_errors(f"{where}: shard {name}", revision):
            remote = api.parse_safetensors_file_metadata(repo, name, revision=commit)
        return planned_header(_as_header_doc(remote), path=root / name, where=f"{where}: {name}")

    checkpoint = open_base(root, read_shard=read_shard, origin=f"{repo}@{commit}", remote_files=frozenset(listing))
    return HubBase(repo, commit, checkpoint, cached, {s: listing.get(s, 0) for s in checkpoint.shards})


def _listing(api: Any, repo: str, commit: str, root: Path) -> dict[str, int]:
    """File name -> size at ``commit`` (from the Hub; offline, from the cached snapshot)."""
    if offline():
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    from huggingface_hub.hf_api import RepoFile

    return {f.path: f.size for f in api.list_repo_tree(repo, revision=commit, recursive=True) if isinstance(f, RepoFile)}


def _as_header_doc(remote: Any) -> dict[str, Any]:
    """huggingface_hub's SafetensorsFileMetadata back into header form, for our own validation."""
    doc: dict[str, Any] = {name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
                           for name, t in remote.tensors.items()}
    doc["__metadata__"] = remote.metadata or {}
    return doc

