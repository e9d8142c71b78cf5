"""`streammerge verify`: passes a good merge; catches every kind of damage it claims to catch."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from oracle import build_adapter, build_base

from streammerge.cli import main
from streammerge.errors import ExitCode


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("verify")
    base = build_base("qwen2", root / "base", dtype="bf16", sharded=True)
    build_adapter(base, root / "adapter", dtype="bf16", r=4, lora_alpha=8)
    build_adapter(base, root / "other", dtype="bf16", r=4, lora_alpha=8, seed=9)
    for name, extra in (("out", []), ("nosum", ["--no-checksum"])):
        assert main(["--base", str(base), "--adapter", str(root / "adapter"), "--output", str(root / name), "-q", *extra]) == 0
    return root


def run_verify(root: Path, out: Path, capsys, adapter: str = "adapter") -> tuple[int, dict]:
    rc = main(["verify", "--base", str(root / "base"), "--adapter", str(root / adapter), "--output", str(out), "--json"])
    return rc, json.loads(capsys.readouterr().out)


def damaged_copy(root: Path, src: str, dst: Path) -> Path:
    shutil.copytree(root / src, dst)
    return dst


def tensor_offset(path: Path, name: str) -> tuple[int, dict]:
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0], header[name]


def flip(path: Path, at: int, delta: int) -> None:
    data = bytearray(path.read_bytes())
    value = struct.unpack_from("<H", data, at)[0]
    struct.pack_into("<H", data, at, (value + delta) & 0xFFFF)
    path.write_bytes(bytes(data))


def shard_of(out: Path, name: str) -> Path:
    return out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_good_merge_verifies(merged, capsys) -> None:
    rc, report = run_verify(merged, merged / "out", capsys)
    assert rc == 0 and report["ok"], report["problems"]
    assert report["tensors_sampled"] == 14 and report["tensors_compared"] > 0 and report["shards_hashed"] > 0
    assert 0 < report["max_error_ratio"] <= 1


def test_one_ulp_in_a_merged_row_is_caught(merged, tmp_path: Path, capsys) -> None:
    out = damaged_copy(merged, "nosum", tmp_path / "out")  # no checksums: the row check must find it
    name = "model.layers.1.self_attn.q_proj.weight"
    at, _ = tensor_offset(shard_of(out, name), name)
    flip(shard_of(out, name), at, 1)  # row 0, column 0: always sampled
    rc, report = run_verify(merged, out, capsys)
    assert rc == ExitCode.VERIFY and any(name in p and "row 0" in p for p in report["problems"])


def test_changed_untouched_byte_is_caught(merged, tmp_path: Path, capsys) -> None:
    out = damaged_copy(merged, "nosum", tmp_path / "out")
    name = "model.norm.weight"
    at, info = tensor_offset(shard_of(out, name), name)
    flip(shard_of(out, name), at + 2 * (info["shape"][0] - 1), 1)  # the last element
    rc, report = run_verify(merged, out, capsys)
    assert rc == ExitCode.VERIFY and any(f"{name}: differs from the base" in p for p in report["problems"])


def test_checksum_mismatch_is_caught(merged, tmp_path: Path, capsys) -> None:
    out = damaged_copy(merged, "out", tmp_path / "out")
    name = "model.embed_tokens.weight"
    at, _ = tensor_offset(shard_of(out, name), name)
    flip(shard_of(out, name), at, 0x100)
    rc, report = run_verify(merged, out, capsys)
    assert rc == ExitCode.VERIFY and any("sha256 does not match" in p for p in report["problems"])


def test_missing_manifest_is_not_a_finished_merge(merged, tmp_path: Path, capsys) -> None:
    out = damaged_copy(merged, "out", tmp_path / "out")
    (out / "streammerge.json").unlink()
    rc, report = run_verify(merged, out, capsys)
    assert rc == ExitCode.VERIFY and "not a finished streammerge output" in report["problems"][0]


def test_wrong_adapter_is_caught(merged, capsys) -> None:
    rc, report = run_verify(merged, merged / "out", capsys, adapter="other")
    assert rc == ExitCode.VERIFY and sum("one-rounding bound" in p for p in report["problems"]) >= 10


def test_missing_tensor_is_caught(merged, tmp_path: Path, capsys) -> None:
    out = damaged_copy(merged, "nosum", tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.norm.weight")
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, report = run_verify(merged, out, capsys)
    assert rc == ExitCode.VERIFY and "missing ['model.norm.weight']" in report["problems"][0]
