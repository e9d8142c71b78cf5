"""Hub repos fetched through huggingface_hub's real download code, from a Hub endpoint on 127.0.0.1
(tests/fakehub.py) named by HF_ENDPOINT: headers first, shards one at a time, --low-disk measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakehub import COMMIT, FakeHub
from oracle import report as oracle_report
from oracle import assert_merged, build_adapter, build_base

from streammerge.cli import main
from streammerge.sources.fetch import FETCH_DIR, HOLD
from streammerge.output.directory import STAGING


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("repos")
    base = build_base("llama", root / "base", dtype="bf16", sharded=True)
    peft = build_adapter(base, root / "lora", dtype="bf16", r=4, lora_alpha=8)
    other = build_adapter(build_base("gpt2", root / "gpt2", dtype="bf16", sharded=False), root / "gpt2-lora",
                          dtype="bf16", r=4, lora_alpha=8)
    return {"base": base, "peft": peft, "gpt2_lora": other.adapter}


def streammerge(args: list[str], *, hub: FakeHub, home: Path, cwd: Path, token: str | None = None
                ) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HOME=str(home), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        env.pop(name, None)
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "streammerge", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def served(tmp_path: Path, repos: dict) -> FakeHub:
    hub = FakeHub()
    hub.add("org/tiny-llama", repos["base"])
    hub.add("org/tiny-lora", repos["peft"].adapter)
    hub.add("org/gpt2-lora", repos["gpt2_lora"])
    return hub


def shard_names(base: Path) -> list[str]:
    return sorted(p.name for p in base.glob("*.safetensors"))


def test_headers_first_then_shards_one_at_a_time_through_the_cache(tmp_path: Path, repos: dict) -> None:
    home, work = tmp_path / "hf", tmp_path / "work"
    work.mkdir()
    with served(tmp_path, repos) as hub:
        done = streammerge(["--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "-q", "--json"],
                           hub=hub, home=home, cwd=work)
    assert done.returncode == 0, done.stderr
    report = oracle_report(done.stdout)
    out = Path(report["output"])
    assert out == work / "tiny-llama-merged"
    assert_merged(out, repos["base"], repos["peft"].deltas)
    names = shard_names(repos["base"])
    downloads = [p.rsplit("/", 1)[1] for p in hub.downloads() if "/org/tiny-llama/" in p]
    assert sorted(downloads) == names and len(downloads) == len(names)  # each shard once, whole
    first_download = next(i for i, r in enumerate(hub.requests) if r[0] == "GET" and not r[2] and
                          r[1].endswith(".safetensors") and "tiny-llama" in r[1])
    header_reads = [i for i, r in enumerate(hub.requests) if r[2] and "tiny-llama" in r[1]]
    assert len(header_reads) == len(names) and max(header_reads) < first_download  # the plan came first
    assert report["shards_downloaded"] == len(names) and report["base_commit"] == COMMIT
    snapshot = home / "hub" / "models--org--tiny-llama" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.glob("*.safetensors")) == names  # kept in the user's cache


def on_a_terminal(args: list[str], *, hub: FakeHub, home: Path, cwd: Path) -> str:
    """Run streammerge with stderr on a pseudo-terminal (progress bars are drawn only on one); its text."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a width, or bars are empty
    env = dict(os.environ, HF_HOME=str(home), HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1")
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        env.pop(name, None)
    child = subprocess.Popen([sys.executable, "-m", "streammerge", *args], stdout=subprocess.DEVNULL, stderr=slave,
                             env=env, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert child.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal")
def test_download_and_merge_progress_on_a_terminal(tmp_path: Path, repos: dict) -> None:
    with served(tmp_path, repos) as hub:
        shown = on_a_terminal(["--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "--output",
                               str(tmp_path / "out")], hub=hub, home=tmp_path / "hf", cwd=tmp_path)
        quiet = on_a_terminal(["--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "--output",
                               str(tmp_path / "quiet"), "-q"], hub=hub, home=tmp_path / "hf-q", cwd=tmp_path)
    for shard in shard_names(repos["base"]):  # huggingface_hub's bar for each shard downloaded
        assert shard in shown
    assert "merging" in shown and "100%" in shown  # and the merge's own bar
    assert quiet.strip() == ""


def test_bad_adapter_is_refused_before_any_shard_is_downloaded(tmp_path: Path, repos: dict) -> None:
    with served(tmp_path, repos) as hub:
        done = streammerge(["--base", "org/tiny-llama", "--adapter", "org/gpt2-lora", "--output",
                            str(tmp_path / "out")], hub=hub, home=tmp_path / "hf", cwd=tmp_path)
        plan = streammerge(["plan", "--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "--json"],
                           hub=hub, home=tmp_path / "hf", cwd=tmp_path)
    assert done.returncode == 4 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["tensors_merged"] > 0
    assert [p for p in hub.downloads() if "tiny-llama" in p] == []  # headers only, by range requests
    assert len(hub.header_reads()) == 2 * len(shard_names(repos["base"]))
    assert not (tmp_path / "out").exists()


def test_low_disk_holds_at_most_two_base_shards_and_leaves_the_cache_alone(tmp_path: Path, repos: dict) -> None:
    home, out = tmp_path / "hf", tmp_path / "out"
    fetch_dir = out / STAGING / FETCH_DIR
    seen: list[int] = []

    def on_disk() -> int:  # base shards in the private folder, finished or still downloading
        return sum(1 for p in fetch_dir.rglob("*") if p.is_file() and ".safetensors" in p.name
                   and not p.name.endswith((".lock", ".metadata")))

    def observe(method: str, path: str) -> None:
        if method == "GET" and "/resolve/" in path and path.endswith(".safetensors"):
            seen.append(on_disk())
            time.sleep(0.05)  # a slow link: the merge would run ahead if it could

    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(on_disk())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    with served(tmp_path, repos) as hub:
        hub.observer = observe
        sampler.start()
        try:
            done = streammerge(["--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "--output", str(out),
                                "--low-disk", "-q", "--json"], hub=hub, home=home, cwd=tmp_path)
        finally:
            stop.set()
            sampler.join()
    assert done.returncode == 0, done.stderr
    assert_merged(out, repos["base"], repos["peft"].deltas)
    assert len(seen) > 50 and max(seen) <= HOLD, max(seen)
    assert max(seen) >= 1  # the sampler did see downloads in the folder
    assert len([p for p in hub.downloads() if "tiny-llama" in p]) == len(shard_names(repos["base"]))
    assert not (home / "hub" / "models--org--tiny-llama").exists()  # the cache was not used
    assert not (home / "hub" / "models--org--tiny-lora").exists()
    assert not (out / STAGING).exists()


def test_two_outputs_from_one_download_of_each_shard(tmp_path: Path, repos: dict) -> None:
    outs = [tmp_path / "merged-a", tmp_path / "merged-b"]
    with served(tmp_path, repos) as hub:
        done = streammerge(["--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "--output", str(outs[0]),
                            "--adapter", f"org/tiny-lora@{COMMIT}", "--output", str(outs[1]), "--low-disk", "-q"],
                           hub=hub, home=tmp_path / "hf", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for out in outs:
        assert_merged(out, repos["base"], repos["peft"].deltas)
    downloads = [p for p in hub.downloads() if "/org/tiny-llama/" in p]
    assert len(downloads) == len(set(downloads)) == len(shard_names(repos["base"]))  # once for both outputs
    assert not (tmp_path / "hf" / "hub" / "models--org--tiny-llama").exists()


def test_single_file_base_and_a_shard_already_cached(tmp_path: Path, repos: dict) -> None:
    """A base without an index; and with --low-disk, a shard already in the cache is read there,
    neither downloaded again nor deleted."""
    single = build_base("llama", tmp_path / "single", dtype="bf16", sharded=False)
    home = tmp_path / "hf"
    cached = shard_names(repos["base"])[0]
    with served(tmp_path, repos) as hub:
        hub.add("org/single", single)
        one = streammerge(["--base", "org/single", "--adapter", "org/tiny-lora", "--output", str(tmp_path / "one"),
                           "--low-disk", "-q"], hub=hub, home=home, cwd=tmp_path)
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HOME": str(home),
                                                                               "HF_ENDPOINT": hub.url}
        got = subprocess.run([sys.executable, "-c", "from huggingface_hub import hf_hub_download as d; "
                              f"d('org/tiny-llama', '{cached}')"], env=env, capture_output=True, text=True)
        assert got.returncode == 0, got.stderr
        before = len(hub.downloads())
        two = streammerge(["--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "--output", str(tmp_path / "two"),
                           "--low-disk", "-q"], hub=hub, home=home, cwd=tmp_path)
        fetched = [p.rsplit("/", 1)[1] for p in hub.downloads()[before:] if "/org/tiny-llama/" in p]
    assert one.returncode == 0, one.stderr
    assert_merged(tmp_path / "one", single, repos["peft"].deltas)
    assert two.returncode == 0, two.stderr
    assert_merged(tmp_path / "two", repos["base"], repos["peft"].deltas)
    assert sorted(fetched) == [s for s in shard_names(repos["base"]) if s != cached]
    snapshot = home / "hub" / "models--org--tiny-llama" / "snapshots" / COMMIT
    assert (snapshot / cached).resolve().is_file()  # still in the cache
    assert [p.name for p in snapshot.glob("*.safetensors")] == [cached]  # and nothing else added there


def test_a_failed_download_keeps_the_merged_shards_for_a_rerun(tmp_path: Path, repos: dict) -> None:
    out, home = tmp_path / "out", tmp_path / "hf"
    args = ["--base", "org/tiny-llama", "--adapter", "org/tiny-lora", "--output", str(out), "--low-disk", "-q"]
    with served(tmp_path, repos) as hub:
        third = shard_names(repos["base"])[2]  # not the first in the merge's order (that is lm_head's shard)
        hub.refuse = {third}
        failed = streammerge(args, hub=hub, home=home, cwd=tmp_path)
        hub.refuse = set()
        before = len(hub.downloads())
        again = streammerge([*args, "--json"], hub=hub, home=home, cwd=tmp_path)
        fetched_again = [p.rsplit("/", 1)[1] for p in hub.downloads()[before:] if "/org/tiny-llama/" in p]
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 3 and len(lines) == 1, failed.stderr
    assert third in lines[0] and "rerun the same command to resume" in lines[0]
    assert again.returncode == 0, again.stderr
    report = oracle_report(again.stdout)
    assert report["shards_resumed"] >= 1 and len(fetched_again) == len(shard_names(repos["base"])) - report["shards_resumed"]
    assert_merged(out, repos["base"], repos["peft"].deltas)


def test_hub_errors_are_one_line(tmp_path: Path, repos: dict) -> None:
    with served(tmp_path, repos) as hub:
        hub.add("org/gated", repos["base"], gated=True)
        runs = {
            "gated": streammerge(["--base", "org/gated", "--adapter", "org/tiny-lora", "--output", str(tmp_path / "o")],
                                 hub=hub, home=tmp_path / "hf", cwd=tmp_path),
            "repository not found": streammerge(["--base", "org/nope", "--adapter", "org/tiny-lora", "--output",
                                                 str(tmp_path / "o")], hub=hub, home=tmp_path / "hf", cwd=tmp_path),
            "revision 'v9' not found": streammerge(["--base", "org/tiny-llama@v9", "--adapter", "org/tiny-lora",
                                                    "--output", str(tmp_path / "o")], hub=hub, home=tmp_path / "hf",
                                                   cwd=tmp_path),
        }
        with_token = streammerge(["--base", "org/gated", "--adapter", "org/tiny-lora", "--output", str(tmp_path / "t"),
                                  "-q"], hub=hub, home=tmp_path / "hf", cwd=tmp_path, token="hf_test_token")
    for expected, done in runs.items():
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 3 and len(lines) == 1, done.stderr
        assert expected in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
    assert with_token.returncode == 0, with_token.stderr  # HF_TOKEN reaches the Hub through huggingface_hub
    assert_merged(tmp_path / "t", repos["base"], repos["peft"].deltas)


def test_the_next_shard_is_requested_before_the_current_one_is_merged(tmp_path: Path, repos: dict,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's side of prefetching, with a recording stand-in for the shard source."""
    import streammerge
    import streammerge.api

    events: list[tuple[str, str]] = []

    class Recording:
        def prefetch(self, shard: str) -> None:
            events.append(("prefetch", shard))

        def local(self, shard: str) -> None:
            events.append(("local", shard))

        def release(self, shard: str) -> None:
            events.append(("release", shard))

        def close(self) -> None:
            pass

    monkeypatch.setattr(streammerge.api, "LocalShards", Recording)
    streammerge.merge(repos["base"], [repos["peft"].adapter], output=tmp_path / "out", progress=False)
    names = [s for e, s in events if e == "local"]  # the plan's order
    assert sorted(names) == shard_names(repos["base"])
    assert sorted(s for e, s in events if e == "release") == sorted(names)
    for k, shard in enumerate(names):
        assert events.index(("local", shard)) < events.index(("release", shard))
        if k + 1 < len(names):  # asked for while shard k is still being merged
            assert events.index(("prefetch", names[k + 1])) < events.index(("release", shard))


def test_gguf_from_a_hub_base_with_low_disk(tmp_path: Path) -> None:
    """A GGUF straight from a Hub base (config and tokenizer fetched with the headers, shards one at a
    time into a private folder beside the file, deleted): byte for byte the GGUF of a local run, the
    cache untouched, nothing left beside the file (general.name: the repo's name as the folder's)."""
    pytest.importorskip("gguf")
    pytest.importorskip("sentencepiece")
    from gguf_ref import with_tokenizer

    base = with_tokenizer(build_base("llama", tmp_path / "tok-llama", dtype="bf16", sharded=True), tmp_path)
    lora = build_adapter(base, tmp_path / "lora", dtype="bf16", r=4, lora_alpha=8).adapter
    local, remote, home = tmp_path / "local.gguf", tmp_path / "out" / "remote.gguf", tmp_path / "hf"
    remote.parent.mkdir()
    assert main(["--base", str(base), "--adapter", str(lora), "--output", str(local), "--dtype", "q8_0", "-q"]) == 0
    with FakeHub() as hub:
        hub.add("org/tok-llama", base)
        done = streammerge(["--base", "org/tok-llama", "--adapter", str(lora), "--output", str(remote), "--dtype",
                            "q8_0", "--low-disk", "-q"], hub=hub, home=home, cwd=tmp_path)
        fetched = [p for p in hub.downloads() if p.endswith(".safetensors")]
    assert done.returncode == 0, done.stderr
    assert remote.read_bytes() == local.read_bytes()
    assert len(fetched) == len(shard_names(base))
    assert sorted(p.name for p in remote.parent.iterdir()) == ["remote.gguf"]  # no partial, no fetch folder
    assert not (home / "hub" / "models--org--tok-llama").exists()
