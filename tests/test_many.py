"""N adapters -> N merged checkpoints in one pass over the base (one --output per --adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from oracle import reports as oracle_reports
from oracle import assert_merged, build_adapter, build_base, tree_digest

import streammerge
from streammerge.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("many")
    base = build_base("llama", root / "base", dtype="bf16", sharded=True)
    adapters = [
        build_adapter(base, root / "a0", dtype="bf16", seed=1, r=4, lora_alpha=8),
        build_adapter(base, root / "a1", dtype="bf16", seed=2, r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        build_adapter(base, root / "a2", dtype="bf16", seed=3, r=2, lora_alpha=16, use_rslora=True),
    ]
    return {"base": base, "adapters": adapters}


def without_manifest(digest: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in digest.items() if k != "streammerge.json"}


def test_one_pass_writes_what_separate_runs_write(tmp_path: Path, inputs: dict,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    base, adapters = inputs["base"], inputs["adapters"]
    outs = [tmp_path / f"out{i}" for i in range(len(adapters))]
    args = ["--base", str(base), "--device", "cpu", "--max-mem", "64MB", "-q", "--json"]
    for peft, out in zip(adapters, outs):
        args += ["--adapter", str(peft.adapter), "--output", str(out)]
    assert main(args) == 0
    reports = oracle_reports(capsys.readouterr().out)
    assert [r["output"] for r in reports] == [str(o) for o in outs]
    for peft, out, report in zip(adapters, outs, reports):
        assert assert_merged(out, base, peft.deltas) == report["tensors_merged"] > 0
        alone = tmp_path / f"alone-{out.name}"
        streammerge.merge(base, [peft.adapter], output=alone, device="cpu", max_mem=64 * 10**6, progress=False)
        assert without_manifest(tree_digest(out)) == without_manifest(tree_digest(alone))
    assert reports[1]["tensors_merged"] < reports[0]["tensors_merged"]  # q_proj, v_proj only


def test_output_count_must_match_the_adapters(tmp_path: Path, inputs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapters = inputs["base"], inputs["adapters"]
    args = ["--base", str(base), "--output", str(tmp_path / "a"), "--output", str(tmp_path / "b")]
    for peft in adapters:
        args += ["--adapter", str(peft.adapter)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 --output for 3 --adapter: give one --output per --adapter" in err[0]
    same = ["--base", str(base), "--adapter", str(adapters[0].adapter), "--output", str(tmp_path / "s"),
            "--adapter", str(adapters[1].adapter), "--output", str(tmp_path / "s")]
    assert main(same) == 5
    assert "overlap" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "s").exists()


def test_an_interrupted_pass_resumes_every_output(tmp_path: Path, inputs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of the lockstep: the shards each output finished are kept, the rerun
    redoes only the rest, and the results equal uninterrupted separate runs."""
    from streammerge.run.task import Target

    base, adapters = inputs["base"], inputs["adapters"][:2]
    jobs = [([p.adapter], tmp_path / f"out{i}") for i, p in enumerate(adapters)]
    finish, calls = Target.finish, []

    def finish_then_stop(self: Target, shard: str, release) -> None:
        calls.append(self)
        if len(calls) == 5:  # both outputs finished shards 1 and 2; the first is at shard 3
            for target in set(calls):
                target.io.drain()  # (a real Ctrl-C may also land before the last fsync is recorded)
            raise KeyboardInterrupt
        finish(self, shard, release)

    monkeypatch.setattr(Target, "finish", finish_then_stop)
    with pytest.raises(KeyboardInterrupt):
        streammerge.merge_many(base, jobs, device="cpu", progress=False)
    monkeypatch.setattr(Target, "finish", finish)
    for _, out in jobs:
        staged = sorted(p.name for p in (out / ".streammerge-partial").glob("*.safetensors"))
        assert len(staged) == 2 and not (out / "model.safetensors.index.json").exists()
    reports = streammerge.merge_many(base, jobs, device="cpu", progress=False)
    assert [r.shards_resumed for r in reports] == [2, 2]
    for (adapter_list, out), peft in zip(jobs, adapters):
        assert_merged(out, base, peft.deltas)
        alone = tmp_path / f"alone-{out.name}"
        streammerge.merge(base, adapter_list, output=alone, device="cpu", progress=False)
        assert without_manifest(tree_digest(out)) == without_manifest(tree_digest(alone))


def test_batch_file_with_a_weighted_sum_per_output(tmp_path: Path, inputs: dict,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    base, (a0, a1, a2) = inputs["base"], inputs["adapters"]
    batch = tmp_path / "jobs.json"
    batch.write_text(json.dumps([{"output": str(tmp_path / "x"), "adapters": [str(a0.adapter)]},
                                 {"output": str(tmp_path / "y"), "adapters": [f"{a1.adapter}:0.5", f"{a2.adapter}:2"]}]))
    assert main(["--base", str(base), "--batch", str(batch), "-q", "--json"]) == 0
    assert [r["output"] for r in oracle_reports(capsys.readouterr().out)] == [str(tmp_path / "x"), str(tmp_path / "y")]
    assert_merged(tmp_path / "x", base, a0.deltas)
    weighted = {m: [(a, b, s * 0.5) for a, b, s in a1.deltas.get(m, [])] + [(a, b, s * 2.0) for a, b, s in a2.deltas.get(m, [])]
                for m in set(a1.deltas) | set(a2.deltas)}
    assert_merged(tmp_path / "y", base, weighted)  # 0.5 * delta_1 + 2 * delta_2, float64 reference
    bad = tmp_path / "bad.json"
    bad.write_text('[{"output": "z"}]')
    assert main(["--base", str(base), "--batch", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected a non-empty JSON list" in err[0]
    assert main(["--base", str(base), "--batch", str(batch), "--adapter", str(a0.adapter)]) == 2
    assert "replaces --adapter and --output" in capsys.readouterr().err


def test_different_kinds_of_adapter_in_one_pass(tmp_path: Path, inputs: dict) -> None:
    """A DoRA adapter on the embedding (column norms from a first pass over the tensor) next to a plain
    all-linear one: each output still equals its own separate run byte for byte."""
    base = inputs["base"]
    dora = build_adapter(base, tmp_path / "dora", dtype="bf16", seed=7, r=4, lora_alpha=8, use_dora=True,
                         target_modules=["embed_tokens", "q_proj"])
    plain = inputs["adapters"][0]
    jobs = [([dora.adapter], tmp_path / "out-dora"), ([plain.adapter], tmp_path / "out-plain")]
    reports = streammerge.merge_many(base, jobs, device="cpu", max_mem=64 * 10**6, progress=False)
    assert reports[0].tensors_merged == 3 and reports[1].tensors_merged == reports[1].adapter_modules
    for adapters, out in jobs:
        alone = tmp_path / f"alone-{out.name}"
        streammerge.merge(base, adapters, output=alone, device="cpu", max_mem=64 * 10**6, progress=False)
        assert without_manifest(tree_digest(out)) == without_manifest(tree_digest(alone))
