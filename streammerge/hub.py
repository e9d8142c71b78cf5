"""Inputs named by a Hugging Face Hub repo id: ``org/name`` or ``org/name@revision``.

huggingface_hub is the client: its cache layout (``models--org--name/snapshots/<rev>``), token,
endpoint and offline mode (``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``) apply unchanged. A local directory always wins over a repo id of the same text.

This first version resolves the whole snapshot (from the cache, or downloading what is missing)
before planning; fetching shards one at a time and ``--low-disk`` are not built yet.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

_REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def is_repo_id(text: str) -> bool:
    return not Path(text).exists() and _REPO.match(text) is not None


def resolve(text: str, *, role: str) -> Path:
    """A local directory as given, or the local snapshot directory of a Hub repo id."""
    match = _REPO.match(text)
    if Path(text).exists() or match is None:
        return Path(text)
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf

    repo, revision = match["repo"], match["rev"]
    where = f"{role} {text}"
    try:
        return Path(snapshot_download(repo, revision=revision))
    except hf.GatedRepoError:
        raise InputError(f"{where}: the repository is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except hf.RepositoryNotFoundError:
        raise InputError(f"{where}: repository not found (or private: set HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise InputError(f"{where}: revision {revision!r} not found in {repo}") from None
    except hf.LocalEntryNotFoundError:
        raise InputError(f"{where}: not in the local cache and the Hub cannot be reached (HF_HUB_OFFLINE is set, "
                         "or no network); download it first or pass a local directory") from None
    except (hf.HfHubHTTPError, OSError) as exc:
        raise InputError(f"{where}: cannot fetch from the Hub ({type(exc).__name__}: {exc})") from None
