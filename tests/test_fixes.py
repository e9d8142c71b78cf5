"""Regressions for what a new user broke (issue 11): each test failed before its fix.

1. --overwrite data loss (in test_errors.py: test_overwrite_keeps_every_file_no_streammerge_merge_wrote)
2. --dtype fp16 writing Inf silently, and verify calling it verified
3. the resume fingerprint recording the device asked for instead of the device used
4. the Python API not checking its arguments
and the smaller refusals and warnings filed with them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from oracle import bits, build_adapter, build_base, exact_and_bound, read_checkpoint, tree_digest
from oracle import report as oracle_report
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.cli import main
from streammerge.errors import ExitCode


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fixes")
    base = build_base("llama", root / "base", dtype="bf16", sharded=True)
    build_adapter(base, root / "adapter", dtype="bf16", r=4, lora_alpha=8)
    return base, root / "adapter"


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streammerge: error: "), lines
    return lines[0]


# 2. a conversion that overflows the output dtype
def overflowing_base(tmp_path: Path, pristine: tuple[Path, Path]) -> tuple[Path, str]:
    """The base with one untouched (converted, not merged) bf16 value past fp16's range."""
    base = Path(shutil.copytree(pristine[0], tmp_path / "base"))
    shard = sorted(base.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("norm.weight"))
    tensors[name][0] = 70000.0  # finite in bf16, Inf once rounded to fp16
    save_file(tensors, shard, metadata={"format": "pt"})
    return base, name


def test_fp16_overflow_of_a_converted_tensor_is_refused(tmp_path: Path, pristine: tuple[Path, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    base, name = overflowing_base(tmp_path, pristine)
    digest = tree_digest(base)
    out = tmp_path / "out"
    rc = main(["--base", str(base), "--adapter", str(pristine[1]), "--output", str(out), "--dtype", "fp16", "-q"])
    assert rc == ExitCode.INPUT
    line = one_line(capsys)
    assert f"{name!r} produced NaN or Inf" in line and "overflows the output dtype" in line
    assert not out.exists() and tree_digest(base) == digest


def test_verify_fails_on_non_finite_output(tmp_path: Path, pristine: tuple[Path, Path],
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An output with Inf in a converted tensor (written as the old merge wrote it) is not verified,
    although its bytes are the base's rounded once."""
    from streammerge.run.processor import Processor

    base, name = overflowing_base(tmp_path, pristine)
    out = tmp_path / "out"
    monkeypatch.setattr(Processor, "_check_finite", staticmethod(lambda *a: None))  # the old, unchecked merge
    assert main(["--base", str(base), "--adapter", str(pristine[1]), "--output", str(out), "--dtype", "fp16", "-q"]) == 0
    monkeypatch.undo()
    assert not torch.isfinite(read_checkpoint(out)[name]).all()
    capsys.readouterr()
    assert main(["verify", str(out)]) == ExitCode.VERIFY
    assert "NaN or Inf in the output" in capsys.readouterr().out


# 3. the fingerprint has the device used
def stop_after_first_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    from streammerge.run.task import Target

    finish = Target.finish

    def finish_then_stop(self: Target, shard: str, release) -> None:
        finish(self, shard, release)
        self.io.drain()
        raise KeyboardInterrupt

    monkeypatch.setattr(Target, "finish", finish_then_stop)


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device auto is CUDA here: the shards are rightly redone")
def test_shards_made_on_the_cpu_resume_under_device_auto(tmp_path: Path, pristine: tuple[Path, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = pristine
    out = tmp_path / "out"
    stop_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge(base, adapter, output=out, device="cpu", progress=False)
    monkeypatch.undo()
    report = streammerge.merge(base, adapter, output=out, device="auto", progress=False)
    assert report.shards_resumed == 1 and report.device == "cpu"


def test_the_fingerprint_is_of_the_resolved_device(pristine: tuple[Path, Path]) -> None:
    from streammerge.output.manifest import shard_fingerprint
    from streammerge.run.compute import Compute, Runtime
    from streammerge.run.workingset import WorkingSet

    plan = streammerge.load_inputs(pristine[0], [pristine[1]])
    shard = next(iter(plan.shards))
    prints = {kind: shard_fingerprint(plan, shard, device=kind, chunk=1024) for kind in ("cpu", "cuda")}
    assert prints["cpu"] != prints["cuda"]  # bytes made on CUDA are not taken for the CPU's, nor the reverse
    compute = Compute(WorkingSet.of(plan, 2**30), "auto", Runtime(), reserve_core=False)
    assert compute.device_kind() == ("cuda" if torch.cuda.is_available() else "cpu")  # what "auto" resolved to


# 4. the Python API checks its arguments
def test_api_takes_one_path_and_sizes_as_text(tmp_path: Path, pristine: tuple[Path, Path]) -> None:
    base, adapter = pristine
    report = streammerge.merge(str(base), str(adapter), output=str(tmp_path / "out"), max_mem="64MB", device="cpu",
                               progress=False)
    assert report.tensors_merged == 14 and report.max_mem == 64 * 1000**2


@pytest.mark.parametrize("kwargs, error, needle", [
    ({"max_mem": [1]}, TypeError, "max_mem must be a number of bytes or a size"),
    ({"max_mem": "lots"}, ValueError, "max_mem: cannot read size 'lots'"),
    ({"dtype": "int4"}, ValueError, "dtype 'int4' is not one of"),
    ({"overwrite": "yes"}, TypeError, "overwrite must be True or False"),
    ({"include": ["("]}, ValueError, "include '(' is not a valid regex"),
    ({"colour": "red"}, TypeError, "unknown option(s) colour"),
    ({"adapters": 42}, TypeError, "adapters must be a path"),
    ({"base": None}, TypeError, "base must be a path or a repo id"),
    ({"output": 3}, TypeError, "output must be a path"),
])
def test_api_refuses_bad_arguments_by_name(tmp_path: Path, pristine: tuple[Path, Path], kwargs: dict, error: type,
                                           needle: str) -> None:
    args = {"base": pristine[0], "adapters": pristine[1], "output": tmp_path / "out", **kwargs}
    with pytest.raises(error, match=__import__("re").escape(needle)):
        streammerge.merge(args.pop("base"), args.pop("adapters"), **args)
    assert not (tmp_path / "out").exists()


# the smaller refusals and warnings
def test_the_same_adapter_twice_is_refused_unless_allowed(tmp_path: Path, pristine: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = pristine
    args = ["--base", str(base), "--adapter", str(adapter), "--adapter", f"{adapter}/../{adapter.name}:0.5",
            "--output", str(tmp_path / "out"), "-q"]
    assert main(args) == ExitCode.PLAN
    assert "is given twice" in one_line(capsys) and not (tmp_path / "out").exists()
    assert main(args + ["--allow-duplicate"]) == 0  # then added twice: W + 1.5 s B A
    plan = streammerge.load_inputs(base, [adapter])
    got, ref = read_checkpoint(tmp_path / "out"), read_checkpoint(base)
    module = "model.layers.0.self_attn.q_proj"
    a, b = (plan.adapters[0].load(plan.adapters[0].modules[module].a_key).double(),
            plan.adapters[0].load(plan.adapters[0].modules[module].b_key).double())
    exact, bound = exact_and_bound(ref[f"{module}.weight"], [(a, b, 2.0), (a, b, 2.0)], torch.bfloat16, [1.0, 0.5])
    assert ((got[f"{module}.weight"].double() - exact).abs() <= bound).all()


def test_an_adapter_for_another_named_model_is_a_warning_or_with_strict_an_error(
        tmp_path: Path, pristine: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = (Path(shutil.copytree(p, tmp_path / p.name)) for p in pristine)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-llama"}))
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": "org/other"}))
    args = ["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out"), "-q"]
    assert main(args + ["--strict"]) == ExitCode.PLAN
    assert "was trained on org/other" in one_line(capsys) and not (tmp_path / "out").exists()
    assert main(args + ["--json"]) == 0
    report = oracle_report(capsys.readouterr().out)
    assert any("trained on org/other" in w and "org/tiny-llama" in w for w in report["warnings"])
    # the same model named two ways (a cache folder of it) is no mismatch
    (adapter / "adapter_config.json").write_text(json.dumps(
        {**adapter_config, "base_model_name_or_path": "/hf/hub/models--org--tiny-llama/snapshots/abc"}))
    assert main(args + ["--overwrite", "--strict"]) == 0


def test_a_tensor_replaced_and_merged_is_reported_as_both(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An embedding saved with the adapter (PEFT's save_embedding_layers) with LoRA on top."""
    base = build_base("llama", tmp_path / "base", dtype="fp32", sharded=False)
    build_adapter(base, tmp_path / "adapter", dtype="fp32", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out"),
                 "-q", "--json"]) == 0
    report = oracle_report(capsys.readouterr().out)
    assert report["tensors_merged"] == 3 and report["tensors_replaced"] == 1 == report["tensors_merged_on_replaced"]
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out2")]) == 0
    assert "replaced 1 (1 of them also merged)" in capsys.readouterr().out


@pytest.mark.parametrize("role", ["--base", "--adapter"])
def test_a_missing_local_path_says_so(tmp_path: Path, pristine: tuple[Path, Path], role: str,
                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    given = {"--base": str(pristine[0]), "--adapter": str(pristine[1])}
    for missing, needle in (("./nope", "nope: no such directory"),  # not a repo id: a path only
                            ("my/lora", "my/lora: no such local directory, and as a Hub repo id: not in the local "
                             "cache")):  # both tried (HF_HUB_OFFLINE in the tests)
        args = {**given, role: missing}
        assert main(["--base", args["--base"], "--adapter", args["--adapter"], "--output", "out", "-q"]) == ExitCode.INPUT
        assert needle in one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_untouched_tensors_stay_bit_identical_with_an_include_filter(tmp_path: Path, pristine: tuple[Path, Path],
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--include: only layer 0 is merged; the rest of the adapter is listed, never dropped silently."""
    base, adapter = pristine
    out = tmp_path / "out"
    assert main(["plan", "--base", str(base), "--adapter", str(adapter), "--include", r"layers\.0\.", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tensors_merged"] == 7 and len(plan["excluded"]) == 7
    assert all(".layers.1." in e for e in plan["excluded"])
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--include", r"layers\.0\.",
                 "--exclude", "v_proj", "-q", "--json"]) == 0
    report = oracle_report(capsys.readouterr().out)
    assert report["tensors_merged"] == 6 and report["tensors_excluded"] == 8
    manifest = json.loads((out / "streammerge.json").read_text())
    assert manifest["excluded"] == report["excluded"] and manifest["options"]["include"] == [r"layers\.0\."]
    got, ref = read_checkpoint(out), read_checkpoint(base)
    changed = {n for n in ref if not torch.equal(bits(got[n]), bits(ref[n]))}
    assert changed == {f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj",
                                                               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert main(["verify", str(out), "-q"]) == 0  # the filters are read back from the manifest
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "none"), "--include",
                 "no_such_module", "-q"]) == ExitCode.PLAN
    assert "--include/--exclude leave nothing to merge" in one_line(capsys)


def test_a_quantized_base_is_refused_by_its_scheme(tmp_path: Path, pristine: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base = Path(shutil.copytree(pristine[0], tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "hqq"}}))
    assert main(["--base", str(base), "--adapter", str(pristine[1]), "--output", str(tmp_path / "out"), "-q"]) \
        == ExitCode.PLAN
    line = one_line(capsys)
    assert "quant_method 'hqq'" in line and "reads: awq, bitsandbytes, compressed-tensors, fp8, gptq" in line


def test_a_qlora_adapter_of_the_4bit_variant_merges_into_the_16bit_base(
        tmp_path: Path, pristine: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Trained on unsloth's 4-bit variant, merged into the 16-bit original (what unsloth and axolotl do):
    a note that says so, not a mismatch (so --strict merges it); another model is still refused."""
    base, adapter = (Path(shutil.copytree(p, tmp_path / p.name)) for p in pristine)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/Tiny-Llama"}))
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(
        {**adapter_config, "base_model_name_or_path": "unsloth/tiny-llama-bnb-4bit"}))
    args = ["--base", str(base), "--adapter", str(adapter)]
    assert main(["plan", *args]) == 0
    shown = capsys.readouterr().out
    assert "note: adapter" in shown and "the quantized variant of the base org/Tiny-Llama" in shown
    assert main([*args, "--output", str(tmp_path / "out"), "--strict", "-q", "--json"]) == 0
    report = oracle_report(capsys.readouterr().out)
    assert report["warnings"] == [] and any("the usual QLoRA export" in n for n in report["notes"])
    assert report["base_kind"] == "16-bit"
    (adapter / "adapter_config.json").write_text(json.dumps(
        {**adapter_config, "base_model_name_or_path": "unsloth/other-model-bnb-4bit"}))
    assert main([*args, "--output", str(tmp_path / "o2"), "--strict", "-q"]) == ExitCode.PLAN
    assert "was trained on unsloth/other-model-bnb-4bit" in one_line(capsys)
