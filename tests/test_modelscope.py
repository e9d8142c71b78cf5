"""ModelScope ids (``modelscope:org/name[@rev]``) through the modelscope package, offline: a cache laid
out as the package lays it out (``{MODELSCOPE_CACHE}/models/{org}--{name}/snapshots/{revision}/``),
which the package itself must resolve before streammerge is asked to."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from oracle import build_adapter, build_base
from oracle import report as oracle_report

import streammerge

modelscope = pytest.importorskip("modelscope", reason="modelscope is a test extra: pip install -e '.[test]'")


def _cache(root: Path, repo: str, source: Path, revision: str = "master") -> Path:
    snapshot = root / "models" / repo.replace("/", "--") / "snapshots" / revision
    shutil.copytree(source, snapshot)
    return snapshot


def _env(cache: Path, home: Path) -> dict[str, str]:
    import os

    return {**os.environ, "MODELSCOPE_CACHE": str(cache), "MODELSCOPE_HOME": str(home), "HF_HUB_OFFLINE": "1",
            "MODELSCOPE_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: a network try fails at once
            "MODELSCOPE_REPO_TREE_PAGE_RETRY_MAX_DELAY_SECONDS": "1", "MODELSCOPE_API_MAX_RETRIES": "1",
            "MODELSCOPE_DOWNLOAD_MAX_RETRIES": "1"}


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streammerge", *args], capture_output=True, text=True, env=env, cwd=cwd)


def _shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def test_base_and_adapter_from_the_modelscope_cache(tmp_path: Path) -> None:
    base = build_base("qwen2", tmp_path / "base", dtype="bf16", sharded=True)
    build_adapter(base, tmp_path / "adapter", dtype="bf16", r=4, lora_alpha=8)
    cache, home = tmp_path / "msc", tmp_path / "mshome"
    snapshot = _cache(cache, "org/tiny-qwen", base)
    _cache(cache, "org/tiny-lora", tmp_path / "adapter", revision="v1")
    probe = ("import sys; from modelscope import snapshot_download; "
             "print(snapshot_download('org/tiny-qwen', local_files_only=True))")
    resolved = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_env(cache, home))
    assert Path(resolved.stdout.strip().splitlines()[-1]) == snapshot, resolved.stderr  # the package's own layout

    work = tmp_path / "work"
    work.mkdir()
    done = _run(["--base", "modelscope:org/tiny-qwen", "--adapter", "modelscope:org/tiny-lora@v1", "-q", "--json"],
                _env(cache, home), work)
    assert done.returncode == 0, done.stderr
    out = Path(oracle_report(done.stdout)["output"])
    assert out == work / "tiny-qwen-merged"  # not inside the cache
    streammerge.merge(base, tmp_path / "adapter", output=tmp_path / "local", progress=False)  # the same, from directories
    assert _shards(out) == _shards(tmp_path / "local") and _shards(out)
    manifest = json.loads((out / "streammerge.json").read_text())
    assert manifest["base"]["path"] == "modelscope:org/tiny-qwen@master"
    assert manifest["adapters"][0]["path"] == "modelscope:org/tiny-lora@v1"
    checked = _run(["verify", str(out)], _env(cache, home), work)  # its inputs read back from the manifest
    assert checked.returncode == 0 and "verified" in checked.stdout, checked.stdout + checked.stderr


def test_modelscope_errors_are_one_line(tmp_path: Path) -> None:
    cache, home = tmp_path / "msc", tmp_path / "mshome"
    cache.mkdir()
    missing = _run(["--base", "modelscope:org/not-cached", "--adapter", "x", "--output", str(tmp_path / "o")],
                   _env(cache, home), tmp_path)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 3 and len(lines) == 1, missing.stderr
    assert "base modelscope:org/not-cached: not in the ModelScope cache and cannot be downloaded" in lines[0]
    low = _run(["--base", "modelscope:org/not-cached", "--adapter", "x", "--low-disk"], _env(cache, home), tmp_path)
    assert low.returncode == 2 and "drop --low-disk" in low.stderr
    assert not (tmp_path / "o").exists()
