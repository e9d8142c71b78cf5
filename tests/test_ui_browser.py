"""The web page in a real browser (issue 15): Debian's chromium driven by Playwright for Python
(``executable_path=/usr/bin/chromium``; never ``playwright install``), against ``streammerge ui``
started here on 127.0.0.1 and stopped by its pid. The test fills the form by its labels, plans,
starts a merge and waits for it, checks the output against the float64 oracle, cancels a second
(larger) job midway, resumes it, verifies it, and counts the page's requests: every one goes to the
server. A reload while the second job runs picks it up. A screenshot of the finished page is saved
beside the test's files (``page.png``)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from oracle import assert_merged, build_adapter, build_base
from test_memory import synthetic

from streammerge.cli import main

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path):  # noqa: ANN201
    """``streammerge ui`` on 127.0.0.1 in its own process group, stopped by its pid."""
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "streammerge", "ui", "--port", str(port), "--jobs-dir",
                              str(tmp_path / "jobs")], stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "api/jobs", timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    else:
        child.kill()
        raise AssertionError(f"the server did not start: {child.stderr.read() if child.stderr else ''}")
    yield url
    os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)


def fill(page, base: Path, adapter: Path, out: Path, max_mem: str) -> None:  # noqa: ANN001
    page.get_by_label("Base model").fill(str(base))
    page.get_by_label("Adapters").fill(str(adapter))
    page.get_by_label("Output", exact=True).fill(str(out))
    page.get_by_label("Device").select_option("cpu")
    page.get_by_label("Memory limit").fill(max_mem)


def test_the_page_plans_runs_cancels_resumes_and_verifies(tmp_path: Path, server: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    base = build_base("llama", tmp_path / "base", dtype="bf16", sharded=True)
    peft = build_adapter(base, tmp_path / "lora", dtype="bf16", r=4, lora_alpha=8)
    (tmp_path / "big").mkdir()
    big_base, big_adapter = synthetic(tmp_path / "big")
    out, big_out, direct = tmp_path / "merged", tmp_path / "big-merged", tmp_path / "direct"
    assert main(["--base", str(big_base), "--adapter", str(big_adapter), "--output", str(direct), "--device", "cpu",
                 "-q", "--max-mem", "64MB"]) == 0
    hosts: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("request", lambda r: hosts.append(urlsplit(r.url).netloc))
        page.goto(server)
        fill(page, base, peft.adapter, out, "256MB")
        page.get_by_role("button", name="Plan").click()
        page.wait_for_function("document.getElementById('plan-out').textContent.includes('tensors change')")
        assert "14 of 21 tensors change" in page.locator("#plan-out").inner_text() and not out.exists()
        page.get_by_role("button", name="Start merge").click()
        page.wait_for_selector("#job-state.finished", timeout=120_000)
        assert "100%" in page.locator("#numbers").inner_text()
        assert_merged(out, base, peft.deltas)
        page.get_by_role("button", name="Verify").click()
        page.wait_for_function("document.getElementById('verify-out').textContent.startsWith('verified')",
                               timeout=120_000)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

        fill(page, big_base, big_adapter, big_out, "64MB")
        page.get_by_role("button", name="Start merge").click()
        page.wait_for_selector("#job-state.running", timeout=120_000)
        page.reload()  # (a reload picks the running job up where it is)
        page.wait_for_function("document.getElementById('log').textContent.includes('shard done')", timeout=120_000)
        page.get_by_role("button", name="Cancel").click()
        page.wait_for_selector("#job-state.cancelled", timeout=120_000)
        assert "kept" in page.locator("#kept").inner_text()
        page.get_by_role("button", name="Resume").click()
        page.wait_for_selector("#job-state.finished", timeout=120_000)
        page.reload()  # (a reload shows the history: both jobs)
        page.wait_for_function("document.querySelectorAll('#jobs tr').length == 2")
        browser.close()
    assert {h for h in hosts} == {urlsplit(server).netloc}, hosts  # no request to any other host
    assert len(hosts) >= 10
    digest = lambda d: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in d.glob("*.safetensors")}  # noqa: E731
    assert digest(big_out) == digest(direct)
