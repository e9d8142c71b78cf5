"""The output directory: where it may be, its lock, its free space, and publishing into it.

Everything is written into ``<output>/.streammerge-partial/`` first; only when every shard, file
and the index are complete are they moved into ``<output>`` (the manifest last), so nothing in
``<output>`` ever looks like a finished merge that is not.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import OutputError

STAGING = ".streammerge-partial"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, output: Path, *, first: list[str], middle: list[str], last: list[str],
            earlier: Iterable[str] = ()) -> None:
    """Move staged files into ``output``: ``first`` (shards), ``middle``, then ``last`` (index, manifest).

    ``earlier``: the files an earlier streammerge merge into ``output`` wrote (its manifest's list).
    Its manifest goes first, so that no mix of old and new files is ever marked finished; then
    the files of that merge which this one does not write, before the new index lands, so that
    loaders that glob ``*.safetensors`` see only this merge. Nothing else in ``output`` is removed.
    Other staged files (resume records) go with the staging area.
    """
    for name in last:
        (output / name).unlink(missing_ok=True)
    keep = set(first) | set(middle) | set(last)
    for stale in sorted(set(earlier) - keep):
        path = output / stale
        if _inside(path, output) and path.is_file():
            path.unlink()
    for rel in first + middle + last:
        dst = output / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dst)
    _fsync_dir(output)
    shutil.rmtree(staging, ignore_errors=True)


def _inside(path: Path, root: Path) -> bool:
    """A name from an earlier manifest is untrusted: only plain paths below ``root`` are removed."""
    return ".." not in Path(path).relative_to(root).parts and path.resolve().is_relative_to(root.resolve())


def foreign_weights(output: Path, *, ours: Iterable[str]) -> list[str]:
    """Weight files in ``output`` that this merge does not write (kept, but a loader may pick them up)."""
    if not output.is_dir():
        return []
    mine = set(ours)
    return sorted(p.name for p in output.iterdir()
                  if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and p.name not in mine)
