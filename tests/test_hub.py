"""Hub repo ids as inputs, resolved by huggingface_hub itself, offline, from a cache laid out as
huggingface_hub lays it out: models--org--name/{blobs/<hash>, snapshots/<rev>/<file> -> blobs, refs/main}."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from oracle import report as oracle_report
from oracle import PeftResult, assert_merged, build_adapter, build_base

REV = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, files: Path, *, ref: str = "main") -> None:
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(REV)
    snap = root / "snapshots" / REV
    for path in files.iterdir():
        blob = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, root / "blobs" / blob)
        (snap / path.name).parent.mkdir(parents=True, exist_ok=True)
        (snap / path.name).symlink_to(os.path.relpath(root / "blobs" / blob, snap))


def cached_repos(tmp_path: Path) -> tuple[Path, PeftResult, Path]:
    """A tiny sharded Llama as org/tiny-llama and its adapter as org/tiny-lora, in HF_HOME's cache."""
    base = build_base("llama", tmp_path / "files-base", dtype="bf16", sharded=True)
    peft = build_adapter(base, tmp_path / "files-adapter", dtype="bf16", r=4, lora_alpha=8)
    home = tmp_path / "hf"
    cache_repo(home / "hub", "org/tiny-llama", base)
    cache_repo(home / "hub", "org/tiny-lora", peft.adapter)
    return base, peft, home


def run(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "streammerge", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_repo_ids_resolve_from_the_cache_offline(tmp_path: Path) -> None:
    base, peft, home = cached_repos(tmp_path)
    before = {p: p.read_bytes() for p in (home / "hub").rglob("*") if p.is_file()}
    work = tmp_path / "work"
    work.mkdir()
    done = run(["--base", "org/tiny-llama", "--adapter", f"org/tiny-lora@{REV}", "-q", "--json"], home, work)
    assert done.returncode == 0, done.stderr
    out = Path(oracle_report(done.stdout)["output"])
    assert out == work / "tiny-llama-merged"  # not inside the cache
    assert_merged(out, base, peft.deltas)
    assert {p: p.read_bytes() for p in (home / "hub").rglob("*") if p.is_file()} == before  # cache untouched


def test_repo_id_errors_are_one_line(tmp_path: Path) -> None:
    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    missing = run(["--base", "org/not-cached", "--adapter", "org/other", "--output", str(tmp_path / "o")], home, tmp_path)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 3 and len(lines) == 1
    assert "base org/not-cached: no such local directory, and as a Hub repo id: not in the local cache" in lines[0]


def test_offline_with_a_shard_missing_from_the_cache_is_one_line(tmp_path: Path) -> None:
    base, peft, home = cached_repos(tmp_path)
    snap = home / "hub" / "models--org--tiny-llama" / "snapshots" / REV
    (snap / "model-00003-of-00005.safetensors").unlink()
    done = run(["--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "--output", str(tmp_path / "o")], home,
               tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3 and len(lines) == 1, done.stderr
    assert "shard model-00003-of-00005.safetensors is not in the local cache and HF_HUB_OFFLINE is set" in lines[0]
    assert not (tmp_path / "o").exists()
