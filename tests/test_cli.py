"""The command line and the Python API: entry points, output formats, plan, demo, fallbacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oracle import report as oracle_report
from oracle import assert_merged, build_adapter, build_base

import streammerge
from streammerge.cli import main
from streammerge.memory import parse_size


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cli")
    base = build_base("qwen2", root / "base", dtype="bf16", sharded=True)
    return base, build_adapter(base, root / "adapter", dtype="bf16", r=4, lora_alpha=8)


def test_help_does_not_import_torch() -> None:
    code = "import sys; from streammerge.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--max-mem" in out and out.strip().endswith("False")


def test_python_dash_m_version() -> None:
    out = subprocess.run([sys.executable, "-m", "streammerge", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"streammerge {streammerge.__version__}"


@pytest.mark.parametrize("text,value", [("512MB", 512 * 10**6), ("20GB", 20 * 10**9), ("20GiB", 20 * 2**30),
                                        ("1.5G", int(1.5 * 2**30)), ("4096", 4096)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_json_report_and_api(tmp_path: Path, model, capsys: pytest.CaptureFixture[str]) -> None:
    base, peft = model
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "--json", "-q",
                 "--max-mem", "256MB", "--device", "cpu"]) == 0
    report = oracle_report(capsys.readouterr().out)
    assert report["tensors_merged"] == 14 and report["adapter_modules"] == 14
    assert report["tensors_merged"] + report["tensors_copied"] == len(json.loads(
        (base / "model.safetensors.index.json").read_text())["weight_map"])
    assert report["max_mem"] == 256 * 10**6 and report["device"] == "cpu" and report["peak_rss"] > 0
    api = streammerge.merge(base, [peft.adapter], output=tmp_path / "api", device="cpu", progress=False)
    assert api.tensors_merged == 14
    assert_merged(tmp_path / "api", base, peft.deltas)


def test_plan_reads_headers_only_and_writes_nothing(tmp_path: Path, model, capsys: pytest.CaptureFixture[str]) -> None:
    base, peft = model
    assert main(["plan", "--base", str(base), "--adapter", str(peft.adapter), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tensors_merged"] == 14
    assert {m["tensor"] for m in plan["modules"]} == {f"{m}.weight" for m in peft.deltas}
    assert not (base.parent / f"{base.name}-merged").exists()


def test_user_map_rule(tmp_path: Path, model, capsys: pytest.CaptureFixture[str]) -> None:
    """An adapter trained under other module names merges once a --map rule renames them."""
    from safetensors.torch import load_file, save_file

    base, peft = model
    adapter = tmp_path / "renamed"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((peft.adapter / "adapter_config.json").read_bytes())
    tensors = load_file(peft.adapter / "adapter_model.safetensors")
    save_file({k.replace(".model.layers.", ".decoder.blocks."): v for k, v in tensors.items()},
              adapter / "adapter_model.safetensors")
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "no"), "-q"]) != 0
    capsys.readouterr()
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out"), "-q",
                 "--map", r"^decoder\.blocks\.=model.layers."]) == 0
    assert_merged(tmp_path / "out", base, peft.deltas)


def test_demo_runs_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", str(tmp_path / "demo")]) == 0
    assert "demo check passed" in capsys.readouterr().out
    assert main(["demo", str(tmp_path / "demo")]) == 0  # rerun replaces its own earlier demo
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    assert main(["demo", str(tmp_path / "mine")]) != 0
    assert (tmp_path / "mine" / "precious.txt").exists()


def test_small_chunks_and_kernel_copy_fallback(tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small chunks per tensor, and untouched tensors copied through the buffer, not the kernel."""
    base, peft = model
    monkeypatch.delattr(os, "copy_file_range")
    from streammerge.run import workingset

    monkeypatch.setattr(workingset, "RESERVE", 0)
    report = streammerge.merge(base, [peft.adapter], output=tmp_path / "out", device="cpu", max_mem=6000,
                               progress=False)
    assert report.chunk_elements < 112 * 64 / 2  # at least two chunks for the MLP weights
    assert_merged(tmp_path / "out", base, peft.deltas)


def test_cuda_oom_shrinks_chunk_then_falls_back_to_cpu(tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The out-of-memory control flow, driven on the CPU by a processor that claims to be CUDA.

    This exercises the shrink-and-fall-back logic only; real CUDA execution is not covered here.
    """
    from streammerge.run import device as devices
    from streammerge.run import processor as kernels

    base, peft = model
    real_init, real_rows = kernels.Processor.__init__, kernels.Processor.merge_rows
    cuda = torch.device("cuda", 0)

    def init(self, device, **kw):
        real_init(self, torch.device("cpu"), **kw)
        self.device = device  # pretend, so that the engine treats OOM as a CUDA OOM

    def rows(self, slot, **kw):
        # big chunks fail everywhere; layer 1 fails at any size (the GPU is "full")
        if self.device.type == "cuda" and (kw["rows"] * kw["cols"] > 1000 or ".layers.1." in kw["tensor"]):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_rows(self, slot, **kw)

    monkeypatch.setattr(kernels.Processor, "__init__", init)
    monkeypatch.setattr(kernels.Processor, "merge_rows", rows)
    monkeypatch.setattr(kernels.Processor, "to_device", lambda self, t: t.contiguous())
    monkeypatch.setattr(devices, "resolve_device", lambda spec: cuda)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    report = streammerge.merge(base, [peft.adapter], output=tmp_path / "out", device="cuda", max_mem=40 * 2**20,
                               progress=False)
    assert any("chunk shrunk" in n for n in report.notes), report.notes
    assert any("finishing the merge on the CPU" in n for n in report.notes)
    assert_merged(tmp_path / "out", base, peft.deltas)
