"""Bad input: one clear line on stderr, a specific non-zero exit, nothing written that looks
complete, and the base byte-identical afterwards."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from oracle import report as oracle_report
from oracle import bits, build_adapter, build_base, read_checkpoint, tree_digest
from safetensors.torch import load_file, save_file

from streammerge.adapters.peft import _UNSUPPORTED_FIELDS
from streammerge.cli import main
from streammerge.errors import ExitCode


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pristine")
    base = build_base("llama", root / "base", dtype="bf16", sharded=True)
    build_adapter(base, root / "adapter", dtype="bf16", r=4, lora_alpha=8)
    return base, root / "adapter"


@pytest.fixture
def inputs(tmp_path: Path, pristine: tuple[Path, Path]) -> tuple[Path, Path]:
    """Fresh copies each test may break."""
    base, adapter = (shutil.copytree(p, tmp_path / p.name) for p in pristine)
    return Path(base), Path(adapter)


def fails(capsys: pytest.CaptureFixture[str], code: ExitCode, needle: str, base: Path, *args: object) -> str:
    """Run the CLI expecting failure; check the one-line message, the exit code and the aftermath."""
    digest = tree_digest(base)
    rc = main([str(a) for a in args] + ["-q"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("streammerge: error: "), err
    assert needle in lines[0], lines[0]
    assert tree_digest(base) == digest
    return lines[0]


def no_output(out: Path) -> None:
    assert not out.exists() or not [p for p in out.rglob("*") if p.suffix in (".safetensors", ".json")]


def shard(base: Path, i: int = 0) -> Path:
    return sorted(base.glob("model-*.safetensors"))[i]


def test_missing_shard(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    missing = shard(base, 1)
    missing.unlink()
    fails(capsys, ExitCode.INPUT, f"shard {missing.name} listed in the index is missing", base,
          "--base", base, "--adapter", adapter, "--output", tmp_path / "out")
    no_output(tmp_path / "out")


@pytest.mark.parametrize("damage,needle", [
    (lambda b: b"\xff" * 8 + b[8:], "exceeds"),
    (lambda b: struct.pack("<Q", 16) + b"not json at all!" + b[24:], "not valid JSON"),
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:5], "too short"),
    (lambda b: b + b"extra", "truncated or padded"),
], ids=["huge-length", "garbage-json", "truncated", "stub", "trailing-bytes"])
def test_corrupt_shard(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                       damage, needle: str) -> None:
    base, adapter = inputs
    target = shard(base, 0)
    target.write_bytes(damage(target.read_bytes()))
    line = fails(capsys, ExitCode.INPUT, needle, base, "--base", base, "--adapter", adapter, "--output", tmp_path / "out")
    assert target.name in line
    no_output(tmp_path / "out")


def test_no_checkpoint(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, adapter = inputs
    (tmp_path / "empty").mkdir()
    fails(capsys, ExitCode.INPUT, "no model.safetensors.index.json", tmp_path / "empty",
          "--base", tmp_path / "empty", "--adapter", adapter, "--output", tmp_path / "out")
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"pickle")
    fails(capsys, ExitCode.INPUT, "convert the checkpoint to safetensors first", tmp_path / "empty",
          "--base", tmp_path / "empty", "--adapter", adapter, "--output", tmp_path / "out")


def test_adapter_for_a_model_of_another_size(tmp_path: Path, inputs: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base, _ = inputs
    other = build_base("llama", tmp_path / "other", dtype="bf16", sharded=False, seed=3)
    cfg = json.loads((other / "config.json").read_text())
    # same names, wider MLP: every mlp projection mismatches
    import transformers

    cfg["intermediate_size"] = 48
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cfg.items()
                                                                       if k not in ("architectures", "transformers_version")}))
    shutil.rmtree(other)
    model.save_pretrained(other)
    build_adapter(other, tmp_path / "wrong", dtype="bf16", r=4, lora_alpha=8)
    fails(capsys, ExitCode.PLAN, "trained on a model of another size", base,
          "--base", base, "--adapter", tmp_path / "wrong", "--output", tmp_path / "out")
    no_output(tmp_path / "out")


def test_adapter_for_another_architecture(tmp_path: Path, inputs: tuple[Path, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("self_attn.q_proj", "attn.c_attn"): v for k, v in tensors.items()}
    save_file(renamed, adapter / "adapter_model.safetensors")
    line = fails(capsys, ExitCode.PLAN, "have no tensor in base", base,
                 "--base", base, "--adapter", adapter, "--output", tmp_path / "out")
    assert "model.layers.0.attn.c_attn" in line and "12 of 14 modules matched" in line
    no_output(tmp_path / "out")


def test_missing_adapter_config(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    (adapter / "adapter_config.json").unlink()
    fails(capsys, ExitCode.INPUT, "no adapter_config.json", base,
          "--base", base, "--adapter", adapter, "--output", tmp_path / "out")
    no_output(tmp_path / "out")


@pytest.mark.parametrize("edit,needle", [
    ({"use_dora": True}, "use_dora=True but 0 module(s) have a lora_magnitude_vector"),
    ({"peft_type": "ADAMSS"}, "peft_type 'ADAMSS' is not merged by streammerge"),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"r": -3}, "'r' must be an integer"),
    ({"lora_alpha": "eight"}, "'lora_alpha' must be a finite number"),
    ({"r": 8}, "the config says r=8"),
], ids=["dora", "adamss", "layer-replication", "pissa", "negative-r", "alpha-type", "rank-mismatch"])
def test_adapter_config_refusals(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                 edit: dict, needle: str) -> None:
    base, adapter = inputs
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    assert fails(capsys, ExitCode.PLAN if not {"r", "lora_alpha", "use_dora"} & set(edit) else ExitCode.INPUT,
                 needle, base, "--base", base, "--adapter", adapter, "--output", tmp_path / "out")
    no_output(tmp_path / "out")


def test_unknown_adapter_tensor_is_not_dropped(tmp_path: Path, inputs: tuple[Path, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_magnitude_vector"] = torch.ones(112)
    save_file(tensors, adapter / "adapter_model.safetensors")
    fails(capsys, ExitCode.INPUT, "use_dora=False but 1 module(s) have a lora_magnitude_vector", base,
          "--base", base, "--adapter", adapter, "--output", tmp_path / "out")


@pytest.mark.parametrize("where", ["base", "inside", "parent", "adapter"])
def test_output_overlapping_inputs_is_refused(tmp_path: Path, inputs: tuple[Path, Path],
                                              capsys: pytest.CaptureFixture[str], where: str) -> None:
    base, adapter = inputs
    out = {"base": base, "inside": base / "merged", "parent": tmp_path, "adapter": adapter}[where]
    fails(capsys, ExitCode.OUTPUT, "choose a separate directory", base,
          "--base", base, "--adapter", adapter, "--output", out)
    assert not (base / "merged").exists()


def test_existing_output_needs_overwrite_and_stale_shards_go(tmp_path: Path, inputs: tuple[Path, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--overwrite removes the files an earlier streammerge merge wrote (its manifest lists them) that
    the new merge does not write; a loader that globs *.safetensors then sees only the new merge."""
    base, adapter = inputs
    out = tmp_path / "out"
    single = tmp_path / "single"  # an earlier merge of a one-file checkpoint: model.safetensors
    build_base("llama", single, dtype="bf16", sharded=False)
    build_adapter(single, tmp_path / "single-adapter", dtype="bf16", r=4, lora_alpha=8)
    assert main(["--base", str(single), "--adapter", str(tmp_path / "single-adapter"), "--output", str(out), "-q"]) == 0
    assert (out / "model.safetensors").exists()
    (out / "notes.txt").write_text("mine")
    fails(capsys, ExitCode.OUTPUT, "pass --overwrite", base, "--base", base, "--adapter", adapter, "--output", out)
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--overwrite", "-q"]) == 0
    assert not (out / "model.safetensors").exists()  # the earlier merge's, listed in its manifest
    assert (out / "notes.txt").read_text() == "mine"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert {p.name for p in out.glob("*.safetensors")} == set(index["weight_map"].values())


def test_overwrite_keeps_every_file_no_streammerge_merge_wrote(tmp_path: Path, inputs: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Regression (data loss): with no earlier manifest in OUT, --overwrite deleted every weight-suffixed
    file it did not write. Now nothing but what the merge writes changes, and the report says what is there."""
    base, adapter = inputs
    out = tmp_path / "out"
    out.mkdir()
    mine = {"q4.gguf": b"GGUF mine", "training_args.bin": b"pickle", "other.index.json": b"{}",
            "notes.txt": b"notes", "model-00009-of-00009.safetensors": b"someone else's"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--overwrite", "-q"]) == 0
    assert {name: (out / name).read_bytes() for name in mine} == mine
    assert "also holds weight files this merge did not write" in capsys.readouterr().out


def test_default_output_is_beside_the_base(inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    assert main(["--base", str(base), "--adapter", str(adapter), "-q"]) == 0
    merged = base.parent / f"{base.name}-merged"
    assert (merged / "model.safetensors.index.json").exists()
    assert str(merged) in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal when CUDA is absent")
def test_cuda_requested_without_cuda(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    fails(capsys, ExitCode.DEVICE, "CUDA is not available", base,
          "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--device", "cuda:0")
    no_output(tmp_path / "out")


def test_budget_too_small(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    fails(capsys, ExitCode.DEVICE, "raise --max-mem to at least", base,
          "--base", base, "--adapter", adapter, "--output", tmp_path / "out", "--max-mem", "1MB")
    no_output(tmp_path / "out")


def test_bad_max_mem_is_a_usage_error(inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    with pytest.raises(SystemExit) as exc:
        main(["--base", str(base), "--adapter", str(adapter), "--max-mem", "lots"])
    assert exc.value.code == ExitCode.USAGE
    assert "512MB, 20GB, 20GiB" in capsys.readouterr().err


def test_failure_mid_merge_leaves_nothing(tmp_path: Path, inputs: tuple[Path, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An overflow found in the second shard: the first shard was already written, and is removed."""
    base, adapter = inputs
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][0, 0] = float("inf")
    save_file(tensors, adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    fails(capsys, ExitCode.INPUT, "'model.layers.1.mlp.down_proj.weight' produced NaN or Inf", base,
          "--base", base, "--adapter", adapter, "--output", out)
    assert not out.exists()  # bad input is not resumable state: everything is removed


@pytest.mark.parametrize("value, dtype, bad", [
    (float("nan"), torch.bfloat16, True),
    (float("-inf"), torch.float32, True),
    (70000.0, torch.float16, True),  # finite in float32, Inf once rounded to fp16
    (3e38, torch.bfloat16, False),  # finite everywhere, but the block's sum overflows: not an error
])
def test_finite_check_of_a_merged_block(value: float, dtype: torch.dtype, bad: bool) -> None:
    from streammerge.run.processor import NonFiniteError, Processor

    block = torch.full((64, 4096), 1.0).to(dtype)
    block[3, :] = torch.tensor(value).to(dtype)
    if bad:
        with pytest.raises(NonFiniteError, match=r"'w' produced NaN or Inf \(rows 10..73\)"):
            Processor._check_finite(block, "w", 10)
    else:
        Processor._check_finite(block, "w", 10)


def test_interrupt_mid_merge_leaves_resumable_state(tmp_path: Path, inputs: tuple[Path, Path],
                                                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C mid-merge: exit 130, nothing that looks finished, the base untouched; a rerun resumes
    from the finished shards and gives the same bytes as an uninterrupted run."""
    from streammerge.run import processor as kernels

    base, adapter = inputs
    calls = {"n": 0}
    real = kernels.Processor.merge_rows

    def interrupted(self, slot, **kw):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(self, slot, **kw)

    monkeypatch.setattr(kernels.Processor, "merge_rows", interrupted)
    digest = tree_digest(base)
    out = tmp_path / "out"
    args = ["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q", "--json"]
    assert main(args) == ExitCode.INTERRUPTED
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert tree_digest(base) == digest
    assert [p.name for p in out.iterdir()] == [".streammerge-partial"]  # nothing outside the staging area
    staged = {p.name for p in (out / ".streammerge-partial").iterdir()} - {".lock"}
    records = {n for n in staged if n.endswith(".done.json")}
    assert records and staged == records | {n.removesuffix(".done.json") for n in records}  # no partial shard left

    monkeypatch.setattr(kernels.Processor, "merge_rows", real)
    assert main(args) == 0
    report = oracle_report(capsys.readouterr().out)
    assert report["shards_resumed"] == len(records)
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "clean"), "-q"]) == 0
    assert tree_digest(out) == tree_digest(tmp_path / "clean") | {"streammerge.json": tree_digest(out)["streammerge.json"]}


@pytest.mark.parametrize("edit,needle", [
    ({"r": 10**9}, "'r' must be an integer from 1 to 65536"),
    ({"r": "8"}, "'r' must be an integer"),
    ({"rank_pattern": ["q_proj"]}, "'rank_pattern' must map regexes to numbers"),
    ({"alpha_pattern": {"(": 3}}, "is not a valid regex"),
    ({"lora_alpha": None}, "'lora_alpha' must be a finite number"),
], ids=["absurd-rank", "rank-string", "pattern-list", "pattern-regex", "alpha-null"])
def test_adapter_config_wrong_types(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                    edit: dict, needle: str) -> None:
    base, adapter = inputs
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    fails(capsys, ExitCode.INPUT, needle, base, "--base", base, "--adapter", adapter, "--output", tmp_path / "out")


def test_adapter_tensor_of_wrong_rank(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    tensors[key] = tensors[key].reshape(2, 2, -1)
    save_file(tensors, adapter / "adapter_model.safetensors")
    fails(capsys, ExitCode.INPUT, "the adapter files are inconsistent", base,
          "--base", base, "--adapter", adapter, "--output", tmp_path / "out")


def test_symlinked_adapter_file_escaping_is_refused(tmp_path: Path, inputs: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    moved = tmp_path / "elsewhere.safetensors"
    (adapter / "adapter_model.safetensors").rename(moved)
    (adapter / "adapter_model.safetensors").symlink_to(moved)
    fails(capsys, ExitCode.INPUT, "outside", base, "--base", base, "--adapter", adapter, "--output", tmp_path / "out")


def test_adapter_that_changes_nothing_is_refused(tmp_path: Path, inputs: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """An untrained adapter (PEFT initialises lora_B to zero) must not 'succeed' silently."""
    base, adapter = inputs
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    fails(capsys, ExitCode.PLAN, "changes nothing (every lora_B is zero", base,
          "--base", base, "--adapter", adapter, "--output", out)
    no_output(out)
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q", "--allow-noop"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    assert set(got) == set(ref) and all(torch.equal(bits(got[n]), bits(ref[n])) for n in ref)


def test_adapter_with_weight_zero_is_refused(tmp_path: Path, inputs: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    fails(capsys, ExitCode.PLAN, "its weight is 0", base, "--base", base, "--adapter", f"{adapter}:0",
          "--output", tmp_path / "out")



@pytest.mark.parametrize("field", sorted(_UNSUPPORTED_FIELDS))
def test_every_unmergeable_config_feature_is_refused_by_name(tmp_path: Path, inputs: tuple[Path, Path],
                                                             capsys: pytest.CaptureFixture[str], field: str) -> None:
    base, adapter = inputs
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, field: [1, 2]}))
    fails(capsys, ExitCode.PLAN, f"the adapter uses {_UNSUPPORTED_FIELDS[field]}", base,
          "--base", base, "--adapter", adapter, "--output", tmp_path / "out")
    no_output(tmp_path / "out")


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_mlx_fine_tune_types_are_refused(tmp_path: Path, inputs: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                         kind: str) -> None:
    base, _ = inputs
    adapter = tmp_path / "mlx"
    adapter.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.lora_a": torch.ones(64, 4),
               "model.layers.0.self_attn.q_proj.lora_b": torch.ones(4, 64)}, adapter / "adapters.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": kind, "num_layers": 2,
                                                             "lora_parameters": {"rank": 4, "scale": 2.0}}))
    fails(capsys, ExitCode.PLAN, f"mlx-lm fine_tune_type {kind!r} is not merged", base,
          "--base", base, "--adapter", adapter, "--output", tmp_path / "out")


def test_lora_on_a_convolution_is_refused_by_name(tmp_path: Path, inputs: tuple[Path, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = inputs
    shard = sorted(base.glob("model-*.safetensors"))[0]
    weights = load_file(shard)
    weights["model.conv.weight"] = torch.ones(8, 2, 3, 3, dtype=torch.bfloat16)  # a grouped Conv2d (groups=4)
    save_file(weights, shard, metadata={"format": "pt"})
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.conv.weight"] = shard.name
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.conv.lora_A.weight"] = torch.ones(4, 2, 3, 3)
    tensors["base_model.model.model.conv.lora_B.weight"] = torch.ones(8, 4, 1, 1)
    save_file(tensors, adapter / "adapter_model.safetensors")
    fails(capsys, ExitCode.PLAN, "LoRA on convolution layers (Conv1d/2d/3d, grouped or not) is not merged", base,
          "--base", base, "--adapter", adapter, "--output", tmp_path / "out")
