"""The web UI's API (issue 15) with FastAPI's TestClient: plan, refusals beside their field, a job
run and watched through its server-sent events, cancel midway and resume, verify, the history
after a restart of the server, the token. Jobs are real subprocesses of the CLI; everything stays
on this machine (TestClient talks to the app in process)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from oracle import assert_merged, build_adapter, build_base
from test_memory import synthetic

from streammerge.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from streammerge.ui.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ui")
    base = build_base("llama", root / "base", dtype="bf16", sharded=True)
    peft = build_adapter(base, root / "lora", dtype="bf16", r=4, lora_alpha=8)
    return {"root": root, "base": base, "peft": peft}


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """test_memory's 320 MB checkpoint (3 shards, 3 merged tensors): slow enough to cancel midway."""
    return synthetic(tmp_path_factory.mktemp("ui-big"))


def form(base: Path, adapter: Path, out: Path, **extra: object) -> dict:
    return {"base": str(base), "adapters": str(adapter), "output": str(out), "dtype": "auto", "format": "safetensors",
            "device": "cpu", "max_mem": "256MB", **extra}


def wait(client: TestClient, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['state']}")


def sse(client: TestClient, job_id: str) -> list[dict]:
    """Every event of a job from its SSE stream, read until the stream's own end event."""
    events, kind = [], "message"
    with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                events.append({"event": "end", "job": data} if kind == "end" else data)
                if kind == "end":
                    break
    return events


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))}


def test_plan_then_a_job_watched_to_the_end(tmp_path: Path, tiny: dict) -> None:
    out = tmp_path / "merged"
    with TestClient(create_app(tmp_path / "jobs")) as client:
        planned = client.post("/api/plan", json=form(tiny["base"], tiny["peft"].adapter, out))
        assert planned.status_code == 200, planned.text
        assert planned.json()["tensors_merged"] == 14 and planned.json()["output"]["path"] == str(out)
        assert not out.exists()  # (the plan writes nothing)
        job = client.post("/api/jobs", json=form(tiny["base"], tiny["peft"].adapter, out)).json()
        events = sse(client, job["id"])
        kinds = [e["event"] for e in events]
        assert kinds[0] == "state" and kinds[-1] == "end" and "plan" in kinds and "finished" in kinds
        assert kinds.count("tensor") == 21 and kinds.count("shard_done") == len(digests(tiny["base"]))
        assert [e["state"] for e in events if e["event"] == "state"] == ["queued", "running", "finished"]
        assert events[-1]["job"]["state"] == "finished" and events[-1]["job"]["report"]["tensors_merged"] == 14
        assert_merged(out, tiny["base"], tiny["peft"].deltas)
        listed = client.get("/api/jobs").json()
        assert [j["id"] for j in listed] == [job["id"]] and listed[0]["command"].startswith("streammerge --base ")
        assert client.get(f"/api/jobs/{job['id']}").json()["manifest"]["adapters"]
        verified = client.post(f"/api/jobs/{job['id']}/verify").json()
        assert verified["ok"] and verified["tensors_sampled"] == 14
    with TestClient(create_app(tmp_path / "jobs")) as client:  # a restarted server: the history is kept
        (again,) = client.get("/api/jobs").json()
        assert again["id"] == job["id"] and again["state"] == "finished" and again["verify"]["ok"]


def test_refusals_come_with_the_cli_s_line_and_their_field(tmp_path: Path, tiny: dict, capsys) -> None:
    with TestClient(create_app(tmp_path / "jobs")) as client:
        missing = tmp_path / "nope"
        got = client.post("/api/plan", json=form(missing, tiny["peft"].adapter, tmp_path / "o"))
        assert got.status_code == 400 and got.json()["field"] == "base"
        assert main(["plan", "--base", str(missing), "--adapter", str(tiny["peft"].adapter)]) != 0
        assert got.json()["error"] == capsys.readouterr().err.strip().removeprefix("streammerge: error: ")
        for bad, field in [({"format": "gguf"}, "output"), ({"dtype": "q8_0"}, "dtype"), ({"adapters": ""}, "adapters"),
                           ({"max_mem": "lots"}, "max_mem")]:
            got = client.post("/api/jobs", json=form(tiny["base"], tiny["peft"].adapter, tmp_path / "o", **bad))
            assert got.status_code == 400 and got.json()["field"] == field, (bad, got.json())
        assert client.get("/api/jobs").json() == [] and not (tmp_path / "o").exists()  # nothing queued or written
        assert client.post("/api/jobs/nosuch/cancel").status_code == 404


def test_cancel_midway_then_resume(tmp_path: Path, big: tuple[Path, Path]) -> None:
    """SIGTERM to the job's process group once its first shard is on disk: cancelled, that shard kept;
    Resume finishes it from there; the output is byte for byte a direct run's."""
    base, adapter = big
    out, direct = tmp_path / "merged", tmp_path / "direct"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(direct), "--device", "cpu", "-q",
                 "--max-mem", "64MB"]) == 0
    with TestClient(create_app(tmp_path / "jobs")) as client:
        job = client.post("/api/jobs", json=form(base, adapter, out, max_mem="64MB")).json()
        store = client.app.state.store
        deadline = time.time() + 60
        while "shard_done" not in store.events_path(job["id"]).read_text() and time.time() < deadline:
            time.sleep(0.02)
        client.post(f"/api/jobs/{job['id']}/cancel")
        done = wait(client, job["id"], ("cancelled", "failed", "finished"))
        assert done["state"] == "cancelled", done
        assert (out / ".streammerge-partial").is_dir() and not (out / "model.safetensors.index.json").exists()
        assert client.post(f"/api/jobs/{job['id']}/verify").status_code == 400  # (only a finished job)
        client.post(f"/api/jobs/{job['id']}/resume")
        finished = wait(client, job["id"], ("finished", "failed"))
        assert finished["state"] == "finished" and finished["attempts"] == 2, finished
        assert finished["report"]["shards_resumed"] >= 1
    assert digests(out) == digests(direct)


def test_a_token_guards_every_request(tmp_path: Path) -> None:
    with TestClient(create_app(tmp_path / "jobs", token="s3cret")) as client:
        assert client.get("/api/jobs").status_code == 401
        assert client.get("/api/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        link = client.get("/?token=s3cret", follow_redirects=False)
        assert link.status_code == 303 and "streammerge_token=s3cret" in link.headers["set-cookie"]
        assert client.get("/").status_code == 200  # (the cookie, from now on)


def test_another_host_needs_a_token() -> None:
    done = subprocess.run([sys.executable, "-m", "streammerge", "ui", "--host", "0.0.0.0"], capture_output=True,
                          text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "give --token" in lines[0], done.stderr


def test_a_gguf_job(tmp_path: Path, tiny: dict) -> None:
    """Format gguf: the GGUF types offered, the plan lists the file, the job writes it, verify reads it back."""
    pytest.importorskip("gguf")
    pytest.importorskip("sentencepiece")
    from gguf_ref import with_tokenizer

    base = with_tokenizer(build_base("llama", tmp_path / "base", dtype="bf16", sharded=True), tmp_path)
    out = tmp_path / "merged.Q8_0.gguf"
    with TestClient(create_app(tmp_path / "jobs")) as client:
        assert "q8_0" in client.get("/api/info").json()["gguf_types"]
        request = form(base, tiny["peft"].adapter, out, format="gguf", dtype="q8_0")
        planned = client.post("/api/plan", json=request).json()
        assert planned["gguf"]["file_type"] == "MOSTLY_Q8_0" and not out.exists()
        job = client.post("/api/jobs", json=request).json()
        done = wait(client, job["id"], ("finished", "failed"))
        assert done["state"] == "finished", done
        assert out.stat().st_size == planned["gguf"]["bytes"]
        assert client.post(f"/api/jobs/{job['id']}/verify").json()["ok"]
