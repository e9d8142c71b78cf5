"""The output directory: where it may be, the staging area, non-weight files, config and index.

Everything is written into ``<output>/.streammerge-partial/`` first; only when every shard,
file and the index are complete are they moved into ``<output>`` (index last). A failed run
removes its staging area, so nothing in ``<output>`` ever looks like a finished merge that is not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .checkpoint import INDEX_NAME, BaseCheckpoint
from .errors import OutputError

STAGING = ".streammerge-partial"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapters.safetensors"}
SKIP_DIRS = {".git", ".cache", "__pycache__", STAGING}


def default_output(base: Path) -> Path:
    """Beside the base, never inside it: ``./qwen-72b`` -> ``./qwen-72b-merged``."""
    resolved = base.resolve()
    return resolved.parent / f"{resolved.name}-merged"


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(output: Path, *, base: Path, adapters: list[Path], overwrite: bool) -> None:
    """Refuse an output equal to, inside or containing an input; or non-empty without --overwrite."""
    out = output.resolve()
    for role, path in [("base", base)] + [("adapter", a) for a in adapters]:
        if _related(out, path.resolve()):
            raise OutputError(
                f"--output {output} is the {role} directory, inside it or contains it; "
                f"choose a separate directory (default: {default_output(base)})"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {output} exists and is not a directory")
    if out.is_dir() and any(p.name != STAGING for p in out.iterdir()) and not overwrite:
        raise OutputError(
            f"--output {output} exists and is not empty; pass --overwrite to replace the merged "
            "checkpoint in it, or choose another directory"
        )


LOCK_NAME = ".lock"


def lock_output(staging: Path) -> int:
    """Create the staging area and hold an exclusive lock on it for the whole run, so that two
    merges into one output never mix their files. Returns the descriptor to close at the end."""
    try:
        staging.mkdir(parents=True, exist_ok=True)
        fd = os.open(staging / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"{staging.parent}: cannot create the output ({exc.strerror})") from None
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock on this platform: no protection, as before
        pass
    except OSError:
        os.close(fd)
        raise OutputError(
            f"{staging.parent}: another streammerge run is writing this output right now; wait for it to "
            "finish or choose another --output"
        ) from None
    return fd


def check_free_space(output: Path, need: int, *, what: str = "the merged checkpoint") -> None:
    probe = output if output.exists() else output.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OutputError(
            f"{probe}: {free} bytes free but {what} needs {need}; "
            "free some space or choose another --output"
        )


def aux_files(base: Path) -> list[Path]:
    """Every non-weight file of the base (config, tokenizer, templates, processors, *.py), relative."""
    found = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(WEIGHT_SUFFIXES) or name in ADAPTER_FILES:
                continue
            found.append(Path(dirpath, name).relative_to(base))
    return found


def _set_dtype(config: dict[str, Any], dtype_name: str) -> None:
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype_name
    for value in config.values():  # VLM sub-configs: text_config, vision_config ...
        if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
            _set_dtype(value, dtype_name)


def _set_everywhere(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` at the top level and in every sub-config that has it, or is text_config."""
    config[key] = value
    for name, sub in config.items():
        if isinstance(sub, dict) and (key in sub or name == "text_config"):
            _set_everywhere(sub, key, value)


def copy_aux_files(base: Path, staging: Path, *, config_dtype: str | None,
                   config_changes: dict[str, Any]) -> list[str]:
    """Copy non-weight files into staging; rewrite config.json's dtype when the output dtype
    changed, and set ``config_changes`` (e.g. tie_word_embeddings) at every level."""
    copied = []
    for rel in aux_files(base):
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == Path("config.json") and (config_dtype is not None or config_changes):
            try:
                config = json.loads((base / rel).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise OutputError(f"{base / rel}: cannot update it, not valid JSON ({exc})") from None
            if config_dtype is not None:
                _set_dtype(config, config_dtype)
            for key, value in config_changes.items():
                _set_everywhere(config, key, value)
            dst.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(base / rel, dst)  # follows links: a snapshot's blobs become real files
        copied.append(str(rel))
    return copied


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def copy_tokenizer(adapter: Path, staging: Path) -> list[str]:
    """With a resized vocabulary, the adapter directory's tokenizer files replace the base's."""
    copied = []
    for path in sorted(adapter.iterdir()):
        if path.is_file() and (path.name in TOKENIZER_FILES or path.name.endswith(".tiktoken")):
            shutil.copyfile(path, staging / path.name)
            copied.append(path.name)
    return copied


def write_index(staging: Path, base: BaseCheckpoint, weight_map: dict[str, str], total_size: int) -> None:
    """The base's index metadata (e.g. total_parameters kept) with the new total_size and weight map."""
    assert base.index_metadata is not None
    doc = {"metadata": {**base.index_metadata, "total_size": total_size}, "weight_map": weight_map}
    (staging / INDEX_NAME).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, output: Path, *, first: list[str], middle: list[str], last: list[str]) -> None:
    """Move staged files into ``output``: ``first`` (shards), ``middle``, then ``last`` (index, manifest).

    An earlier merge's manifest goes first, so that no mix of old and new files is ever marked
    finished; stale weight files of that merge (with --overwrite) go before the new index lands,
    so that loaders that glob ``*.safetensors`` see only this merge. Other staged files (resume
    records) are dropped with the staging area.
    """
    for name in last:
        (output / name).unlink(missing_ok=True)
    keep = set(first) | set(middle) | set(last)
    for stale in output.iterdir():
        if stale.is_file() and stale.name not in keep and stale.name.endswith(WEIGHT_SUFFIXES):
            stale.unlink()
    for rel in first + middle + last:
        dst = output / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dst)
    _fsync_dir(output)
    shutil.rmtree(staging, ignore_errors=True)
