"""Batches and spread merges on a real local Ray cluster (ray.cluster_utils: a head without CPUs and
three one-CPU nodes, all on 127.0.0.1), held against local runs of the same jobs, with workers
killed by pid and a node removed mid-run. One cluster for the module: Ray takes seconds a node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from oracle import build_adapter, build_base, tree_digest

import streammerge
from streammerge.cli import main
from streammerge.events import Event

from streammerge.distributed.cluster import LOOPBACK_ENV, on_loopback  # noqa: E402

os.environ.update(LOOPBACK_ENV)  # before Ray is imported: it reads them once (see distributed/cluster.py)
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from streammerge.distributed import Ray  # noqa: E402

OPTS = dict(device="cpu", max_mem="64MB", progress=False)
LOOPBACK_IPS = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
NODE = dict(node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=80 * 2**20)


@pytest.fixture(scope="module")
def cluster() -> Any:
    assert on_loopback(), "Ray would give its nodes the host's address: it was imported before LOOPBACK_ENV was set"
    c = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 0})
    try:
        for _ in range(3):
            c.add_node(**NODE, num_cpus=1)
        assert c.address.startswith("127.0.0.1:"), c.address
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()  # (only this cluster's processes, by their handles)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A sharded llama, four PEFT adapters, and each one's local merge (the reference)."""
    root = tmp_path_factory.mktemp("ray")
    base = build_base("llama", root / "base", dtype="bf16", sharded=True)
    adapters = [build_adapter(base, root / f"a{i}", dtype="bf16", seed=i + 1, r=4 + i, lora_alpha=8).adapter
                for i in range(4)]
    local = []
    for i, adapter in enumerate(adapters):
        streammerge.merge(base, adapter, output=root / f"local{i}", **OPTS)
        local.append(weights(root / f"local{i}"))
    return {"base": base, "adapters": adapters, "local": local}


def weights(out: Path) -> dict[str, str]:
    """Every file's digest but the manifest's (it records times and paths)."""
    return {k: v for k, v in tree_digest(out).items() if k != "streammerge.json"}


class KillOnce:
    """on_event: at the first shard_done of ``output``, ``act(event)`` (the worker is then waiting for
    the driver's acknowledgement, mid-task, with that shard recorded)."""

    def __init__(self, output: Path, act: Any) -> None:
        self.output, self.act, self.fired = str(output), act, None

    def __call__(self, event: Event) -> None:
        if self.fired is None and event.kind == "shard_done" and event.output == self.output:
            self.fired = event.data
            self.act(event)


def sigkill(event: Event) -> None:
    os.kill(event.data["pid"], signal.SIGKILL)


def test_every_socket_of_the_cluster_is_on_loopback(cluster: Any, inputs: dict, tmp_path: Path) -> None:
    streammerge.merge_many(inputs["base"], [(inputs["adapters"][0], tmp_path / "o")], executor=Ray(group=1), **OPTS)
    listening, remote = [], []
    for p in psutil.Process().children(recursive=True):
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        listening += [(p.name(), c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN]
        remote += [(p.name(), c.raddr.ip) for c in conns if c.raddr]
    names = {n for n, _ in listening}
    assert {"gcs_server", "raylet"} <= names and len(listening) >= 10, listening
    assert [x for x in listening if x[1] not in LOOPBACK_IPS] == []
    assert remote and [x for x in remote if x[1] not in LOOPBACK_IPS] == []


def test_a_batch_is_the_local_runs_and_survives_a_killed_worker(cluster: Any, inputs: dict, tmp_path: Path) -> None:
    outs = [tmp_path / f"out{i}" for i in range(4)]
    summary = tmp_path / "summary.json"
    kill = KillOnce(outs[0], sigkill)
    ends: list[Event] = []

    def listen(event: Event) -> None:
        kill(event)
        if event.kind in ("output_done", "finished"):
            ends.append(event)

    reports = streammerge.merge_many(inputs["base"], list(zip(inputs["adapters"], outs)), on_event=listen,
                                     executor=Ray(group=2, summary=summary), **OPTS)
    assert kill.fired is not None
    assert [e.kind for e in ends] == ["output_done"] * 4 + ["finished"]  # a line per output, then the end
    assert sorted(e.output for e in ends[:4]) == sorted(map(str, outs))
    assert [r.output for r in reports] == [str(o) for o in outs]
    for out, local in zip(outs, inputs["local"]):
        assert weights(out) == local
    by = {r.output: r for r in reports}
    assert by[str(outs[0])].cluster["retries"] == 1 and by[str(outs[0])].shards_resumed >= 1  # resumed, not redone
    assert by[str(outs[2])].cluster["retries"] == 0 and by[str(outs[2])].shards_resumed == 0
    doc = json.loads(summary.read_text())
    assert [o["output"] for o in doc["outputs"]] == [str(o) for o in outs] and "error" not in doc
    assert all(o["cluster"]["node"] and o["peak_rss"] > 0 and o["seconds"] > 0 for o in doc["outputs"])
    assert summary.stat().st_mtime_ns >= max((o / "streammerge.json").stat().st_mtime_ns for o in outs)


def test_one_output_spread_over_the_nodes_is_the_local_run(cluster: Any, inputs: dict, tmp_path: Path) -> None:
    out = tmp_path / "spread"
    kill = KillOnce(out, sigkill)
    report = streammerge.merge(inputs["base"], inputs["adapters"][1], output=out, on_event=kill,
                               executor=Ray(shards=True), **OPTS)
    assert kill.fired is not None
    assert weights(out) == inputs["local"][1]
    assert report.cluster["retries"] == 1 and len(report.cluster["nodes"]) >= 2
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(report.cluster["shards"]) == sorted(set(weight_map.values()))  # every shard, by some node
    assert not (out / ".streammerge-partial").exists()
    assert json.loads((out / "streammerge.json").read_text())["shards"]  # recorded with its checksums


def test_a_bad_adapter_fails_on_the_driver_before_any_task(inputs: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((inputs["adapters"][0] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    (tmp_path / "jobs.json").write_text(json.dumps([{"output": "o0", "adapters": [str(inputs["adapters"][0])]},
                                                    {"output": "o1", "adapters": [str(bad)]}]))
    started = time.monotonic()
    # no Ray at that address: the refusal comes from the plan, before anything is asked of a cluster
    code = main(["--base", str(inputs["base"]), "--batch", str(tmp_path / "jobs.json"), "--ray", "127.0.0.1:9",
                 "--device", "cpu", "--max-mem", "64MB", "-q"])
    err = capsys.readouterr().err
    assert code == 3 and time.monotonic() - started < 30
    assert err.count("\n") == 1 and "adapter_model.safetensors" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "jobs.json"]  # nothing written, no summary


def workers_of_this_cluster() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::Worker")]


@pytest.fixture(scope="module")
def fine_base(inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model with a shard of each tensor (21 shards)."""
    import transformers

    base = tmp_path_factory.mktemp("fine") / "base"
    transformers.AutoModelForCausalLM.from_pretrained(inputs["base"]).save_pretrained(base, max_shard_size="10KB")
    assert len(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values())) >= 15
    return base


def test_the_driver_hears_of_each_shard_before_the_worker_goes_on(cluster: Any, inputs: dict, fine_base: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen, behind = [0], []

    def listener(event: Event) -> None:
        if event.kind == "shard_done":
            seen[0] += 1
            recorded = len(list((out / ".streammerge-partial").glob("*.done.json")))
            if recorded != seen[0]:
                behind.append((seen[0], recorded))

    streammerge.merge(fine_base, inputs["adapters"][0], output=out, on_event=listener, executor=Ray(group=1), **OPTS)
    assert seen[0] >= 15 and behind == []


def test_a_rerun_after_the_driver_is_killed_resumes(cluster: Any, inputs: dict, fine_base: Path,
                                                    tmp_path: Path) -> None:
    """The driver (the command line, in its own process) killed at its first shard: with a shard of
    each tensor (21 shards, each waiting for the driver's acknowledgement) its workers are far from done."""
    base = fine_base
    shards = set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values())
    jobs = [{"output": f"o{i}", "adapters": [str(a)]} for i, a in enumerate(inputs["adapters"][:2])]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "streammerge", "--base", str(base), "--batch", str(tmp_path / "jobs.json"),
           "--ray", cluster.address, "--ray-group", "1", "--device", "cpu", "--max-mem", "64MB"]
    env = {**os.environ, **LOOPBACK_ENV}
    driver = subprocess.Popen(cmd + ["--progress", "json"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert driver.stderr is not None
        for line in driver.stderr:
            if line.startswith("{") and json.loads(line)["event"] == "shard_done":
                driver.send_signal(signal.SIGKILL)
                break
    finally:
        driver.kill()
        driver.wait()
    gone = time.monotonic() + 60
    while workers_of_this_cluster():
        assert time.monotonic() < gone, "the killed driver's workers outlived it"
        time.sleep(0.2)
    staged = [len(list((tmp_path / f"o{i}" / ".streammerge-partial").glob("*.done.json"))) for i in range(2)]
    assert 1 <= max(staged) and sum(staged) < 2 * len(shards), staged  # some recorded, none finished
    rerun = subprocess.run(cmd + ["--json", "-q"], capture_output=True, text=True, env=env, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    reports = json.loads(rerun.stdout)["outputs"]
    assert [r["shards_resumed"] for r in reports] == staged
    for i in range(2):
        alone = tmp_path / f"alone{i}"
        streammerge.merge(base, inputs["adapters"][i], output=alone, **OPTS)
        assert weights(tmp_path / f"o{i}") == weights(alone)
    assert [o["shards_resumed"] for o in json.loads((tmp_path / "jobs.summary.json").read_text())["outputs"]] == staged


def test_a_node_removed_mid_run_is_survived(cluster: Any, inputs: dict, tmp_path: Path) -> None:
    outs = [tmp_path / f"out{i}" for i in range(2)]

    def remove(event: Event) -> None:
        node = next(n for n in cluster.worker_nodes if n.node_id == event.data["node"])
        cluster.remove_node(node)

    kill = KillOnce(outs[1], remove)
    try:
        reports = streammerge.merge_many(inputs["base"], list(zip(inputs["adapters"][2:], outs)), on_event=kill,
                                         executor=Ray(group=1), **OPTS)
    finally:
        while len(cluster.worker_nodes) < 3:
            cluster.add_node(**NODE, num_cpus=1)
    assert kill.fired is not None
    for out, local in zip(outs, inputs["local"][2:]):
        assert weights(out) == local
    moved = reports[1].cluster
    assert moved["retries"] == 1 and moved["node"] != kill.fired["node"] and reports[1].shards_resumed >= 1


def test_a_worker_declared_dead_cannot_clobber_its_retry(inputs: dict, tmp_path: Path) -> None:
    """Two attempts at one shard of a spread merge: the first (still writing, then aborted) leaves the
    second's finished shard and record alone. Without a cluster: the worker's own call."""
    from streammerge.api import merge_shards
    from streammerge.inputs import open_inputs
    from streammerge.options import MergeOptions
    from streammerge.output.shardfiles import ShardFilesSink

    out = tmp_path / "out"
    (out / ".streammerge-partial").mkdir(parents=True)  # (the driver's)
    opts = MergeOptions.build(**OPTS)
    plan, _ = open_inputs(inputs["base"], opts).plan([streammerge.AdapterSpec(inputs["adapters"][0])], opts)
    shard = sorted(plan.shards)[1]
    late = ShardFilesSink(plan, out, [shard], checksum=True)
    late.prepare(lambda s: "")
    late.open_shard(shard)  # the first attempt, still writing
    done = merge_shards(inputs["base"], inputs["adapters"][0], out, [shard], **OPTS)
    record = done["records"][shard]
    late.close()  # the first attempt gives up
    staged = out / ".streammerge-partial"
    assert sorted(p.name for p in staged.iterdir()) == sorted([shard, shard + ".done.json"])
    assert json.loads((staged / (shard + ".done.json")).read_text()) == record
    assert record["size"] == (staged / shard).stat().st_size and record["sha256"]
    local = tmp_path / "local"
    streammerge.merge(inputs["base"], inputs["adapters"][0], output=local, **OPTS)
    assert (staged / shard).read_bytes() == (local / shard).read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--ray-shards"], "--ray-shards only applies with --ray"),
    (["--ray-group", "3"], "--ray-group only applies with --ray"),
    (["--ray", "127.0.0.1:9", "--ray-shards"], "--ray-shards spreads the shards of one safetensors output"),
    (["--ray", "127.0.0.1:9", "--ray-group", "0"], "Ray(group=0): expected a whole number of at least 1"),
    (["--ray", "127.0.0.1:9", "--low-disk"], "--low-disk are not available on a cluster"),
    (["--ray", "not an address"], "--ray not an address: expected auto, local or HOST:PORT"),
])
def test_cluster_options_that_do_not_fit_are_one_line(inputs: dict, tmp_path: Path, extra: list[str], message: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--base", str(inputs["base"]), "--device", "cpu", "--max-mem", "64MB", "-q"]
    for i, adapter in enumerate(inputs["adapters"][:2]):
        args += ["--adapter", str(adapter), "--output", str(tmp_path / f"o{i}")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []
