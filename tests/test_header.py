"""The safetensors header parser and the index reader on hostile input, plus bounded fuzzing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from streammerge.formats.checkpoint import open_base
from streammerge.errors import InputError
from streammerge.formats.header import HeaderError, encode_header, parse_header, read_header


def raw_file(header: object, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def parse_bytes(blob: bytes) -> object:
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
    return parse_header(blob[:8], blob[8 : 8 + n], file_size=len(blob), path=Path("x.safetensors"))


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    tensors = {"b": torch.zeros(3, 5, dtype=torch.bfloat16), "a": torch.ones(7), "i": torch.arange(4)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    h = read_header(tmp_path / "m.safetensors")
    assert h.metadata == {"format": "pt"}
    assert {n: (t.dtype, t.shape) for n, t in h.tensors.items()} == {
        "b": ("BF16", (3, 5)), "a": ("F32", (7,)), "i": ("I64", (4,))}
    assert h.data_start + h.data_size == (tmp_path / "m.safetensors").stat().st_size


def test_encode_round_trips_and_aligns() -> None:
    header, offsets = encode_header([("w", "BF16", (2, 3)), ("x", "F32", (5,))], {"format": "pt"})
    assert len(header) % 8 == 0 and offsets == {"w": (0, 12), "x": (12, 32)}
    parsed = parse_bytes(header + b"\0" * 32)
    assert list(parsed.tensors) == ["w", "x"]


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("blob,needle", [
    (raw_file({"a": ENTRY}, b"\0" * 8)[:-1], "truncated"),
    (struct.pack("<Q", 200_000_000) + b"{}", "exceeds"),
    (raw_file(None, raw=b"[1, 2]"), "not an object"),
    (raw_file(None, raw=b"\xff\xfe"), "not valid JSON"),
    (raw_file(None, raw=b'{"a": 1, "a": 2}'), "duplicate key"),
    (raw_file({"a": {**ENTRY, "dtype": "Q4"}}, b"\0" * 8), "unknown dtype"),
    (raw_file({"a": {**ENTRY, "shape": [-2]}}, b"\0" * 8), "invalid shape"),
    (raw_file({"a": {**ENTRY, "shape": [2.0]}}, b"\0" * 8), "invalid shape"),
    (raw_file({"a": {**ENTRY, "data_offsets": [8, 0]}}, b"\0" * 8), "invalid data_offsets"),
    (raw_file({"a": {**ENTRY, "shape": [3]}}, b"\0" * 8), "needs 12"),
    (raw_file({"a": ENTRY, "b": {**ENTRY, "data_offsets": [4, 12]}}, b"\0" * 12), "overlaps"),
    (raw_file({"a": ENTRY, "b": {**ENTRY, "data_offsets": [12, 20]}}, b"\0" * 20), "leaves a hole"),
    (raw_file({"__metadata__": {"format": 1}, "a": ENTRY}, b"\0" * 8), "__metadata__"),
    (raw_file({"a": "F32"}, b""), "not an object"),
    (b"\x01\x02", "too short"),
], ids=["short-data", "huge", "array", "utf8", "dup", "dtype", "neg-shape", "float-shape", "offsets",
        "span", "overlap", "hole", "metadata", "entry", "stub"])
def test_rejects(blob: bytes, needle: str) -> None:
    with pytest.raises(HeaderError, match=needle):
        parse_bytes(blob)


def write_index(root: Path, weight_map: dict[str, str]) -> None:
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("name", ["/etc/passwd.safetensors", "../outside.safetensors", "sub/x.safetensors",
                                  "model.bin", "..", "a\\b.safetensors", 7])
def test_index_rejects_unsafe_shard_names(tmp_path: Path, name: object) -> None:
    write_index(tmp_path, {"w": name})
    with pytest.raises(InputError, match="shard name"):
        open_base(tmp_path)


def test_index_tensor_missing_from_shard(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "s.safetensors")
    write_index(tmp_path, {"a": "s.safetensors", "ghost": "s.safetensors"})
    with pytest.raises(InputError, match="'ghost' is listed in the index but not in the shard"):
        open_base(tmp_path)


VALID = raw_file({"__metadata__": {"format": "pt"}, "a": ENTRY, "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]}},
                 b"\0" * 16)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_only_raise_header_error(blob: bytes) -> None:
    try:
        parse_bytes(blob)
    except HeaderError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(VALID)))
def test_fuzz_mutated_headers_only_raise_header_error(flips: list[tuple[int, int]], cut: int) -> None:
    blob = bytearray(VALID)
    for pos, value in flips:
        blob[pos] = value
    try:
        parse_bytes(bytes(blob[: max(cut, 8)]))
    except HeaderError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]),
                       st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "X", 3]), "shape": json_values,
                                              "data_offsets": json_values}) | json_values, max_size=3),
       st.integers(0, 40))
def test_fuzz_structured_headers_only_raise_header_error(doc: dict, data: int) -> None:
    try:
        parse_bytes(raw_file(doc, b"\0" * data))
    except HeaderError:
        pass


def test_symlink_escaping_the_base_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.zeros(2)}, outside)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").symlink_to(outside)
    with pytest.raises(InputError, match="outside"):
        open_base(base)


def test_symlinks_of_a_hub_cache_snapshot_are_allowed(tmp_path: Path) -> None:
    """models--org--name/snapshots/<rev>/file -> ../../blobs/<hash>, as huggingface_hub lays it out."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    save_file({"a": torch.zeros(2)}, repo / "blobs" / "0123abcd")
    snap = repo / "snapshots" / "deadbeef"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to("../../blobs/0123abcd")
    assert list(open_base(snap).weight_map) == ["a"]


def test_null_metadata_is_absent_metadata() -> None:
    """mlx writes "__metadata__": null; the format makes the field optional."""
    parsed = parse_bytes(raw_file({"__metadata__": None, "a": ENTRY}, b"\0" * 8))
    assert parsed.metadata == {} and list(parsed.tensors) == ["a"]
