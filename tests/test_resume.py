"""Crash safety: kill -9 and SIGTERM in a real subprocess, resume to byte-identical output,
invalidation by changed inputs or options, and a disk that fills up."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from oracle import report as oracle_report
from oracle import tree_digest
from safetensors.torch import save_file

from streammerge.cli import main
from streammerge.errors import ExitCode

STAGING = ".streammerge-partial"


def synthetic(root: Path, *, shards: int = 6, rows: int = 2048, cols: int = 4096) -> tuple[Path, Path]:
    """A checkpoint of `shards` shards, each with one merged and one copied 16 MiB bf16 tensor."""
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    gen = torch.Generator().manual_seed(0)
    weight_map, lora = {}, {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{i}.proj.weight": torch.randn(rows, cols, generator=gen).to(torch.bfloat16),
                   f"layers.{i}.norm.weight": torch.randn(rows, cols, generator=gen).to(torch.bfloat16)}
        save_file(tensors, base / shard, metadata={"format": "pt"})
        weight_map |= {n: shard for n in tensors}
        lora[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(8, cols, generator=gen) * 0.01
        lora[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(rows, 8, generator=gen) * 0.01
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (base / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    return base, adapter


def command(base: Path, adapter: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter), "--output", str(out),
            "--device", "cpu", "--max-mem", "48MB", "--json", "-q", *extra]


def start_and_stop_after_first_shard(cmd: list[str], out: Path, sig: int) -> subprocess.CompletedProcess:
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((out / STAGING).glob("*.done.json")) if (out / STAGING).exists() else True:
        assert child.poll() is None, "the merge finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    child.send_signal(sig)
    stdout, stderr = child.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("resume")
    base, adapter = synthetic(root)
    clean = root / "clean"
    subprocess.run(command(base, adapter, clean), check=True, capture_output=True)
    return base, adapter, tree_digest(clean)


def without_manifest(digest: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in digest.items() if k != "streammerge.json"}


def test_kill_9_then_resume_is_byte_identical(tmp_path: Path, inputs) -> None:
    base, adapter, clean = inputs
    before = tree_digest(base)
    out = tmp_path / "out"
    killed = start_and_stop_after_first_shard(command(base, adapter, out), out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors.index.json").exists() and not (out / "streammerge.json").exists()
    assert not list(out.glob("*.safetensors"))  # nothing outside the staging area looks finished
    resumed = subprocess.run(command(base, adapter, out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    report = oracle_report(resumed.stdout)
    assert 1 <= report["shards_resumed"] < 6
    assert without_manifest(tree_digest(out)) == without_manifest(clean)
    assert tree_digest(base) == before


def test_sigterm_exits_143_with_one_line_and_resumes(tmp_path: Path, inputs) -> None:
    base, adapter, clean = inputs
    out = tmp_path / "out"
    stopped = start_and_stop_after_first_shard(command(base, adapter, out), out, signal.SIGTERM)
    assert stopped.returncode == ExitCode.TERMINATED
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "rerun the same command to resume" in lines[0]
    staged = [p.name for p in (out / STAGING).iterdir() if p.name != ".lock"]
    assert all(n.endswith(".done.json") or (n + ".done.json") in staged for n in staged)  # no partial file
    resumed = subprocess.run(command(base, adapter, out), capture_output=True, text=True)
    assert resumed.returncode == 0 and oracle_report(resumed.stdout)["shards_resumed"] >= 1
    assert without_manifest(tree_digest(out)) == without_manifest(clean)


def test_changed_options_or_inputs_invalidate_kept_shards(tmp_path: Path, inputs) -> None:
    base, adapter, _ = inputs
    out = tmp_path / "out"
    start_and_stop_after_first_shard(command(base, adapter, out), out, signal.SIGKILL)
    changed = subprocess.run(command(base, adapter, out, "--dtype", "fp32"), capture_output=True, text=True)
    assert changed.returncode == 0 and oracle_report(changed.stdout)["shards_resumed"] == 0
    # interrupted again, then the adapter changes: nothing is kept either
    out2 = tmp_path / "out2"
    start_and_stop_after_first_shard(command(base, adapter, out2), out2, signal.SIGKILL)
    copy = tmp_path / "adapter2"
    copy.mkdir()
    for f in adapter.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    os.utime(copy / "adapter_model.safetensors", ns=(1, 1))
    rerun = subprocess.run(command(base, copy, out2), capture_output=True, text=True)
    assert rerun.returncode == 0 and oracle_report(rerun.stdout)["shards_resumed"] == 0


def test_disk_full_is_one_line_and_resumable(tmp_path: Path, inputs, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter, clean = inputs
    real = os.pwrite
    budget = {"bytes": 40 * 2**20}

    def pwrite(fd: int, data, offset: int) -> int:
        budget["bytes"] -= len(data)
        if budget["bytes"] < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.delattr(os, "copy_file_range")  # every byte through pwrite, so the disk "fills"
    out = tmp_path / "out"
    args = ["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--device", "cpu",
            "--max-mem", "48MB", "-q", "--json"]
    assert main(args) == ExitCode.OUTPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "bytes free" in err[0]
    assert not (out / "streammerge.json").exists()
    monkeypatch.setattr(os, "pwrite", real)
    assert main(args) == 0
    assert oracle_report(capsys.readouterr().out)["shards_resumed"] >= 1
    assert without_manifest(tree_digest(out)) == without_manifest(clean)


def test_not_enough_free_space_is_refused_before_writing(tmp_path: Path, inputs, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import shutil
    from collections import namedtuple

    base, adapter, _ = inputs
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q"]) == ExitCode.OUTPUT
    err = capsys.readouterr().err
    assert "1000 bytes free but the merged checkpoint needs" in err
    assert not out.exists()


def test_two_runs_into_one_output_are_refused(tmp_path: Path, inputs, capsys: pytest.CaptureFixture[str]) -> None:
    """While one run holds the output's lock, a second one is refused before touching anything."""
    import fcntl

    base, adapter, _ = inputs
    out = tmp_path / "out"
    (out / STAGING).mkdir(parents=True)
    (out / STAGING / "model-00001-of-00006.safetensors").write_bytes(b"a shard being written")
    fd = os.open(out / STAGING / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q"]) == ExitCode.OUTPUT
        assert "another streammerge run is writing this output" in capsys.readouterr().err
        assert (out / STAGING / "model-00001-of-00006.safetensors").read_bytes() == b"a shard being written"
    finally:
        os.close(fd)
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q"]) == 0
    assert not (out / STAGING).exists() and (out / "streammerge.json").exists()
