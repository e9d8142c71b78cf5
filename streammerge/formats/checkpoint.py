"""Base checkpoints on disk: the index, shard headers, reading byte ranges.

Everything here validates before it reads data: the index and every shard header are checked
when the checkpoint is opened, so a broken base fails before a single output byte is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .header import SafetensorsHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class BaseCheckpoint:
    """A validated base: shard headers in index order and the tensor -> shard map."""

    root: Path
    shards: dict[str, SafetensorsHeader]  # shard file name -> header
    weight_map: dict[str, str]  # tensor name -> shard file name
    index_metadata: dict[str, Any] | None  # None for a single-file checkpoint
    config: dict[str, Any] = field(default_factory=dict)  # config.json ({} when absent or unreadable)
    origin: str | None = None  # "org/name@commit" for a Hub base whose shards are fetched when needed

    @property
    def model_type(self) -> str | None:
        value = self.config.get("model_type")
        return value if isinstance(value, str) else None

    @property
    def ties_embeddings(self) -> bool:
        """tie_word_embeddings, at the top level or in text_config (VLMs); transformers' default is True."""
        text = self.config.get("text_config")
        for cfg in ((text if isinstance(text, dict) else {}), self.config):
            if "tie_word_embeddings" in cfg:
                return bool(cfg["tie_word_embeddings"])
        return True

    @property
    def sharded(self) -> bool:
        return self.index_metadata is not None

    def info(self, name: str) -> TensorInfo:
        return self.shards[self.weight_map[name]].tensors[name]

    @property
    def total_size(self) -> int:
        return sum(h.data_size for h in self.shards.values())


def _check_shard_name(name: Any, root: Path, index: Path) -> str:
    """Index shard names are untrusted: plain file names inside the base, ending .safetensors."""
    if not isinstance(name, str) or not name:
        raise InputError(f"{index}: shard name {name!r} is not a file name")
    if (
        os.path.isabs(name)
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or not name.endswith(".safetensors")
    ):
        raise InputError(
            f"{index}: shard name {name!r} is not allowed; shards must be plain "
            "'*.safetensors' file names inside the base directory"
        )
    return name


def check_inside(path: Path, root: Path) -> None:
    """A symlinked file must resolve inside ``root``, or into the Hugging Face cache's ``blobs/``
    of the same repo when ``root`` is one of its ``snapshots/<rev>`` directories."""
    target, top = path.resolve(), root.resolve()
    allowed = [top]
    if top.parent.name == "snapshots":
        allowed.append(top.parent.parent / "blobs")
    if not any(target.is_relative_to(a) for a in allowed):
        raise InputError(
            f"{path}: is a link to {target}, outside {root}; copy the file into the directory "
            "(links may only point inside it, or into a Hugging Face cache's blobs/)"
        )


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the index ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise InputError(f"{path}: the index has no 'weight_map' object; is it a safetensors index?")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: the index 'metadata' must be an object")
    root = path.parent
    weight_map = {
        str(tensor): _check_shard_name(shard, root, path) for tensor, shard in doc["weight_map"].items()
    }
    if not weight_map:
        raise InputError(f"{path}: the index lists no tensors")
    return weight_map, metadata


def _local_shard(root: Path, name: str) -> SafetensorsHeader:
    path = root / name
    if not path.is_file():
        raise InputError(f"base {root}: shard {name} listed in the index is missing")
    check_inside(path, root)
    return read_header(path)


def open_base(root: Path, *, read_shard: Callable[[str], SafetensorsHeader] | None = None,
              origin: str | None = None, remote_files: frozenset[str] = frozenset()) -> BaseCheckpoint:
    """Open a base directory (index + shards, or a single model.safetensors) and validate it.

    ``read_shard`` gives a shard's header by name (default: read ``root/name``); a Hub base passes
    one that reads cached shards locally and the others' headers remotely, with ``origin`` set and
    the repository's file names in ``remote_files``.
    """
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise InputError(f"base {root}: {what} (pass the folder holding config.json and the safetensors files)")
    index = root / INDEX_NAME
    if index.is_file():
        weight_map, metadata = _read_index(index)
        shard_names = list(dict.fromkeys(weight_map.values()))
    elif (root / SINGLE_NAME).is_file() or SINGLE_NAME in remote_files:
        weight_map, metadata, shard_names = {}, None, [SINGLE_NAME]
    else:
        found = sorted(p.name for p in root.glob("*.safetensors"))
        pickles = sorted(p.name for p in root.glob("pytorch_model*.bin"))
        hint = (f" (found {', '.join(found[:3])} but no index)" if found else
                f" (found {pickles[0]}: convert the checkpoint to safetensors first, e.g. load it with transformers "
                "and save_pretrained)" if pickles else "")
        raise InputError(
            f"base {root}: no {INDEX_NAME} or {SINGLE_NAME}{hint}; "
            "streammerge reads Hugging Face safetensors checkpoints"
        )
    shards = {name: (read_shard or (lambda n: _local_shard(root, n)))(name) for name in shard_names}
    if metadata is None:
        weight_map = {t: SINGLE_NAME for t in shards[SINGLE_NAME].tensors}
    for tensor, shard in weight_map.items():
        if tensor not in shards[shard].tensors:
            raise InputError(
                f"{root / shard}: tensor {tensor!r} is listed in the index but not in the shard"
            )
    return BaseCheckpoint(root, shards, weight_map, metadata, _config(root), origin)


def _config(root: Path) -> dict[str, Any]:
    """config.json, for the layout and tying rules ({} when absent or unreadable: no family rules)."""
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def pread_into(fd: int, offset: int, view: memoryview, *, path: Path) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short read means the file changed under us."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise InputError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


def read_bytes(path: Path, offset: int, nbytes: int) -> bytearray:
    """``nbytes`` of a file from ``offset``, read whole (small tensors: adapter factors, scales)."""
    buf = bytearray(nbytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        pread_into(fd, offset, memoryview(buf), path=path)
    finally:
        os.close(fd)
    return buf


def read_tensor_bytes(header: SafetensorsHeader, name: str) -> bytearray:
    """One tensor's bytes, read whole."""
    info = header.tensors[name]
    return read_bytes(header.path, header.data_start + info.begin, info.nbytes)
