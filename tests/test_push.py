"""--push-to-hub: the operations handed to huggingface_hub (a recording stand-in for HfApi: no Hub is
reachable here) and the model card, parsed back with huggingface_hub's ModelCard."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from huggingface_hub import ModelCard
from oracle import assert_merged, build_adapter, build_base

import streammerge
import streammerge.output.upload
from streammerge.cli import main


class RecordingApi:
    """Records what would be sent: each upload's bytes are hashed when the upload happens."""

    def __init__(self, *, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_on = fail_on

    def _call(self, name: str, detail: Any) -> None:
        if name == self.fail_on:
            raise PermissionError("403 Forbidden: you cannot write to this repo")
        self.calls.append((name, detail))

    def create_repo(self, repo_id: str, *, private: bool, exist_ok: bool) -> None:
        self._call("create_repo", (repo_id, private, exist_ok))

    def create_branch(self, repo_id: str, *, branch: str, exist_ok: bool) -> None:
        self._call("create_branch", (repo_id, branch))

    def preupload_lfs_files(self, repo_id: str, *, additions: list, revision: str | None) -> None:
        for op in additions:
            data = Path(op.path_or_fileobj).read_bytes()
            assert op.upload_info.sha256.hex() == hashlib.sha256(data).hexdigest()
            self._call("preupload", (op.path_in_repo, hashlib.sha256(data).hexdigest(), revision))

    def create_commit(self, repo_id: str, *, operations: list, commit_message: str, revision: str | None) -> Any:
        files = {op.path_in_repo: op.upload_info.sha256.hex() for op in operations}
        self._call("create_commit", (repo_id, files, commit_message, revision))
        return SimpleNamespace(commit_url=f"https://hub.example/{repo_id}/commit/1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("push")
    base = build_base("llama", root / "base", dtype="bf16", sharded=True)
    peft = build_adapter(base, root / "lora", dtype="bf16", r=4, lora_alpha=8)
    config = json.loads((peft.adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/tiny-llama"  # as in an adapter trained from a Hub model
    (peft.adapter / "adapter_config.json").write_text(json.dumps(config))
    reference = root / "reference"
    streammerge.merge(base, [peft.adapter], output=reference, progress=False)
    return {"base": base, "peft": peft, "reference": reference}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_uploads_each_shard_then_one_commit_with_a_card(tmp_path: Path, inputs: dict) -> None:
    api, out = RecordingApi(), tmp_path / "out"
    report = streammerge.merge(inputs["base"], [inputs["peft"].adapter], output=out, progress=False,
                               push_to_hub="me/tiny-merged", private=True, hub_revision="v1", hub_api=api)
    assert_merged(out, inputs["base"], inputs["peft"].deltas)
    names = [c[0] for c in api.calls]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == ["create_repo", "create_branch"] + ["preupload"] * len(shards) + ["create_commit"]
    assert api.calls[0][1] == ("me/tiny-merged", True, True) and api.calls[1][1] == ("me/tiny-merged", "v1")
    manifest = json.loads((out / "streammerge.json").read_text())
    uploaded = {c[1][0]: c[1][1] for c in api.calls if c[0] == "preupload"}
    assert uploaded == {s: manifest["shards"][s]["sha256"] for s in shards}
    repo, files, message, revision = api.calls[-1][1]
    assert repo == "me/tiny-merged" and revision == "v1" and "streammerge" in message
    assert files == {p.name: sha(p) for p in out.iterdir() if p.is_file()}  # everything in the output, once
    assert report.pushed_to == "https://hub.example/me/tiny-merged/commit/1"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.base_model_relation == "merge"
    assert "streammerge" in card.data.tags and card.data.library_name == "transformers"
    assert "`lora` with weight 1" in card.text and streammerge.__version__ in card.text


def test_push_with_low_disk_deletes_each_shard_once_uploaded(tmp_path: Path, inputs: dict) -> None:
    api, out = RecordingApi(), tmp_path / "out"
    deleted_before_commit: list[bool] = []
    commit = api.create_commit

    def create_commit(repo_id: str, **kw: Any) -> Any:
        staged = out / ".streammerge-partial"
        deleted_before_commit.append(not list(staged.glob("model-*.safetensors")))
        return commit(repo_id, **kw)

    api.create_commit = create_commit  # type: ignore[method-assign]
    streammerge.merge(inputs["base"], [inputs["peft"].adapter], output=out, progress=False, low_disk=True,
                      push_to_hub="me/tiny-merged", hub_api=api)
    assert deleted_before_commit == [True]
    assert not out.exists()  # nothing kept locally: the merge is on the Hub
    reference = inputs["reference"]
    files = api.calls[-1][1][1]
    expected = {p.name: sha(p) for p in reference.iterdir() if p.is_file() and p.name not in ("streammerge.json", "README.md")}
    assert {k: v for k, v in files.items() if k not in ("README.md", "streammerge.json")} == expected
    assert {c[1][0] for c in api.calls if c[0] == "preupload"} == {p.name for p in reference.glob("*.safetensors")}


def test_push_refused_before_the_merge_is_one_line(tmp_path: Path, inputs: dict, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(streammerge.output.upload, "_api", lambda: RecordingApi(fail_on="create_repo"))
    out = tmp_path / "out"
    code = main(["--base", str(inputs["base"]), "--adapter", str(inputs["peft"].adapter), "--output", str(out),
                 "--push-to-hub", "me/tiny-merged", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 5 and len(err) == 1
    assert "--push-to-hub me/tiny-merged: creating the repository failed (PermissionError: 403" in err[0]
    assert not out.exists()
    assert main(["--base", str(inputs["base"]), "--adapter", str(inputs["peft"].adapter), "--output", str(out),
                 "--push-to-hub", "not a repo"]) == 5
    assert "not a repo id" in capsys.readouterr().err


def test_a_failed_commit_is_retried_by_rerunning(tmp_path: Path, inputs: dict) -> None:
    out = tmp_path / "out"
    args = dict(output=out, progress=False, push_to_hub="me/tiny-merged")
    with pytest.raises(streammerge.StreamMergeError, match="the commit failed .*rerun the same command to retry"):
        streammerge.merge(inputs["base"], [inputs["peft"].adapter], hub_api=RecordingApi(fail_on="create_commit"), **args)
    assert not (out / "streammerge.json").exists() and not (out / "model.safetensors.index.json").exists()
    api = RecordingApi()
    report = streammerge.merge(inputs["base"], [inputs["peft"].adapter], hub_api=api, **args)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert report.shards_resumed == len(shards) and report.pushed_to
    assert set(api.calls[-1][1][1]) == {p.name for p in out.iterdir() if p.is_file()}
    assert_merged(out, inputs["base"], inputs["peft"].deltas)


def test_hub_options_without_a_hub_are_refused_or_noted(tmp_path: Path, inputs: dict,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--base", str(inputs["base"]), "--adapter", str(inputs["peft"].adapter)]
    assert main([*common, "--output", str(tmp_path / "a"), "--private"]) == 2
    assert "--private only applies with --push-to-hub" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main([*common, "--output", str(tmp_path / "b"), "--low-disk", "-q"]) == 0
    assert "note: --low-disk changed nothing: the base is a local directory" in capsys.readouterr().out
