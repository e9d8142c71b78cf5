"""What a new user meets first: events and progress, the command line's shapes and aliases, the plan
summary, the model card, the tokenizer choice, batch files."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from oracle import assert_merged, build_adapter, build_base
from oracle import report as oracle_report

import streammerge
from streammerge.cli import main
from streammerge.cli.args import PARSERS
from streammerge.errors import ExitCode


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("usability")
    base = build_base("llama", root / "base", dtype="bf16", sharded=True)
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\ntags: [base-only]\n---\n# The base\n")
    peft = build_adapter(base, root / "adapter", dtype="bf16", r=4, lora_alpha=8)
    return base, peft


def test_events_in_order_with_their_bytes(tmp_path: Path, model) -> None:
    base, peft = model
    seen: list[streammerge.Event] = []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "q4.gguf").write_bytes(b"mine")  # kept, and a note says so
    report = streammerge.merge(base, peft.adapter, output=tmp_path / "out", progress=False, on_event=seen.append,
                               overwrite=True)
    kinds = [e.kind for e in seen]
    assert kinds[0] == "plan" and kinds[-1] == "finished"
    assert kinds.count("shard_started") == kinds.count("shard_done") == report.shards
    tensors = [e for e in seen if e.kind == "tensor"]
    assert sum(e.data["bytes"] for e in tensors) == seen[0].data["bytes"] == report.bytes_written
    assert sum(e.data["kind"] == "merged" for e in tensors) == report.tensors_merged
    assert seen[-1].data["reports"][0]["output"] == str(tmp_path / "out")
    notes = [e.data["text"] for e in seen if e.kind == "note"]
    assert notes == report.notes and any("q4.gguf" in n for n in notes)


def test_progress_json_lines_and_a_failed_event(tmp_path: Path, model) -> None:
    base, peft = model
    cmd = [sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(peft.adapter), "--output",
           str(tmp_path / "out"), "--progress", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.splitlines()]
    assert events[0]["event"] == "plan" and events[-1]["event"] == "finished"
    assert {e["event"] for e in events} == {"plan", "shard_started", "tensor", "shard_done", "finished"}
    again = subprocess.run(cmd, capture_output=True, text=True)  # the output is not empty now
    last = json.loads(again.stderr.splitlines()[-2])  # then the one error line
    assert again.returncode == ExitCode.OUTPUT and last["event"] == "failed" and last["exit_code"] == 5


def test_the_plan_line_comes_before_the_first_write(tmp_path: Path, model) -> None:
    base, peft = model
    done = subprocess.run([sys.executable, "-m", "streammerge", "merge", "--base", str(base), "--adapter",
                           str(peft.adapter), "--output", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # (`merge` is an alias of the bare command)
    first = done.stderr.splitlines()[0]
    assert first.startswith("streammerge: writing ") and str(tmp_path / "out") in first


def test_json_errors_and_results_have_one_shape(tmp_path: Path, model, capsys: pytest.CaptureFixture[str]) -> None:
    base, peft = model
    assert main(["--base", str(base), "--adapter", str(tmp_path / "missing"), "--json", "-q"]) == ExitCode.INPUT
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc == {"error": doc["error"], "exit_code": 3} and "no such directory" in doc["error"]
    assert len(captured.err.strip().splitlines()) == 1
    outs = [tmp_path / "a", tmp_path / "b"]
    for jobs in ([peft.adapter], [peft.adapter, peft.adapter]):
        args = ["--base", str(base), "--json", "-q", "--allow-duplicate"]
        for i, a in enumerate(jobs):
            args += ["--adapter", str(a), "--output", str(outs[i] / str(len(jobs)))]
        assert main(args) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["exit_code"] == 0 and len(doc["outputs"]) == len(jobs)


def test_every_option_has_help() -> None:
    for name, make in PARSERS.items():
        for action in make()._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


def test_verify_reads_its_inputs_from_the_manifest(tmp_path: Path, model, capsys: pytest.CaptureFixture[str]) -> None:
    base, peft = model
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", f"{peft.adapter}:0.5", "--output", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "-q"]) == 0
    assert capsys.readouterr().out == ""  # -q: nothing on success
    assert main(["verify", str(out)]) == 0 and "verified" in capsys.readouterr().out
    # the weight came from the manifest: the output is not W + 1.0 s B A
    assert main(["verify", str(out), "--base", str(base), "--adapter", str(peft.adapter)]) == ExitCode.VERIFY
    assert "DIFFERS" in capsys.readouterr().out
    assert main(["verify", str(tmp_path)]) == ExitCode.INPUT
    assert "no streammerge.json" in capsys.readouterr().err


def test_plan_groups_by_rule_and_layer_and_checks_the_output(tmp_path: Path, model,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    base, peft = model
    args = ["plan", "--base", str(base), "--adapter", str(peft.adapter)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("model.layers.{0-1}.self_attn.q_proj.weight  x2  [lora, r=4 scale=2" in line for line in lines)
    assert len(lines) == 8  # seven groups and the total, not one line per module
    assert main(args + ["-v"]) == 0 and len(capsys.readouterr().out.splitlines()) == 15
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(args + ["--output", str(busy)]) == ExitCode.OUTPUT and "not empty" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp_path / "new"), "--json"]) == 0
    output = json.loads(capsys.readouterr().out)["output"]
    assert output["needed_bytes"] > 0 and output["free_bytes"] > output["needed_bytes"]
    assert not (tmp_path / "new").exists()  # plan writes nothing


def test_batch_paths_are_relative_to_the_batch_file(tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch) -> None:
    base, peft = model
    jobs = tmp_path / "jobs"
    shutil.copytree(peft.adapter, jobs / "lora")
    (jobs / "batch.json").write_text(json.dumps([{"output": "merged", "adapters": ["lora:1"]}]))
    monkeypatch.chdir(tmp_path.parent)  # elsewhere
    assert main(["--base", str(base), "--batch", str(jobs / "batch.json"), "-q"]) == 0
    assert_merged(jobs / "merged", base, peft.deltas)


def test_a_local_output_gets_a_card_of_the_merge(tmp_path: Path, model) -> None:
    base, peft = model
    streammerge.merge(base, f"{peft.adapter}", output=tmp_path / "out", progress=False, dtype="fp32")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model_relation == "merge" and card.data.license == "apache-2.0"
    assert card.data.language == ["en"] and "base-only" not in card.data.tags  # the base's tags describe the base
    assert f"`{peft.adapter.name}` with weight 1" in card.text and "F32" in card.text
    assert streammerge.__version__ in card.text and "# The base" not in card.text


def test_tokenizer_from_the_adapter_when_it_differs_or_as_told(tmp_path: Path, model,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    base, peft = model
    adapter = Path(shutil.copytree(peft.adapter, tmp_path / "adapter"))
    (adapter / "chat_template.jinja").write_text("{{ messages }}")
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "a"), "-q", "--json"]) == 0
    report = oracle_report(capsys.readouterr().out)
    assert report["tokenizer_from"] == str(adapter)
    assert any("chat_template.jinja differing from the base's" in n for n in report["notes"])
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == "{{ messages }}"
    mine = tmp_path / "tok"
    mine.mkdir()
    (mine / "tokenizer_config.json").write_text('{"mine": true}')
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "b"), "-q",
                 "--tokenizer", str(mine)]) == 0
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text()) == {"mine": True}
    assert not (tmp_path / "b" / "chat_template.jinja").exists()
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "c"), "-q",
                 "--tokenizer", str(tmp_path)]) == ExitCode.INPUT
    assert "no tokenizer files there" in capsys.readouterr().err


def test_the_text_report_says_what_was_resumed(tmp_path: Path, model, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from test_fixes import stop_after_first_shard

    base, peft = model
    args = ["--base", str(base), "--adapter", str(peft.adapter), "--output", str(tmp_path / "out")]
    stop_after_first_shard(monkeypatch)
    assert main(args + ["-q"]) == ExitCode.INTERRUPTED
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 0
    assert "(1 resumed from an earlier run)" in capsys.readouterr().out


def test_the_bar_counts_in_the_units_it_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    """tqdm labels scaled bytes kB, MB, GB: 3,250,000 bytes must show as 3.25M, not 3.10M (MiB)."""
    import io

    from streammerge.events import Event, ProgressBar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = ProgressBar(enabled=True)
    for event in (Event("plan", None, {"bytes": 3_250_000}), Event("tensor", "o", {"bytes": 3_250_000}),
                  Event("finished", None, {})):
        bar(event)
    assert "3.25M/3.25M" in screen.getvalue() and "3.10M" not in screen.getvalue()
