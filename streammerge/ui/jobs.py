"""Merge jobs for the web UI: a form turned into the CLI's own arguments, a persistent history, and
one runner that takes queued jobs in order and runs each in its own subprocess (its own process
group, so that Cancel signals that group alone, by pid).

A job lives in ``JOBS_DIR/<id>/``: ``job.json`` (its state, form, arguments, report, verify result;
rewritten atomically) and ``events.jsonl`` (the merge's ``--progress json`` events as it printed
them, its other stderr lines as ``log`` events, the runner's ``memory`` samples and ``state``
changes). A server restarted while a job ran finds it ``failed`` (its shards kept: Resume continues
it) and its queued jobs queued again.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..options import DTYPE_CHOICES, GGUF_ONLY

STATES = ("queued", "running", "finished", "failed", "cancelled")
FINAL = ("finished", "failed", "cancelled")
MEMORY_EVERY = 0.5  # seconds between RSS samples of a running job


class FormError(ValueError):
    """A form field the merge cannot take: ``field`` names it, the message says why (the CLI's words)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.field = name


@dataclass
class Form:
    base: str
    adapters: list[str]  # "path[:weight]", one a line in the page
    output: str
    dtype: str = "auto"
    format: str = "safetensors"  # or "gguf"
    tokenizer: str = ""
    device: str = "auto"
    max_mem: str = "4GB"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    gguf_pre: str = ""
    overwrite: bool = False

    @classmethod
    def parse(cls, data: Any) -> Form:
        if not isinstance(data, dict):
            raise FormError("base", "the form must be a JSON object")
        text = {k: str(data.get(k) or "").strip() for k in ("base", "output", "dtype", "format", "tokenizer",
                                                          "device", "max_mem", "gguf_pre")}
        lines = {k: [x.strip() for x in (data.get(k) or []) if str(x).strip()] if isinstance(data.get(k), list)
                 else [x.strip() for x in str(data.get(k) or "").splitlines() if x.strip()]
                 for k in ("adapters", "include", "exclude")}
        form = cls(base=text["base"], adapters=lines["adapters"], output=text["output"],
                   dtype=text["dtype"] or "auto", format=text["format"] or "safetensors",
                   tokenizer=text["tokenizer"], device=text["device"] or "auto", max_mem=text["max_mem"] or "4GB",
                   include=lines["include"], exclude=lines["exclude"], gguf_pre=text["gguf_pre"],
                   overwrite=bool(data.get("overwrite")))
        form.check()
        return form

    def check(self) -> None:
        if not self.base:
            raise FormError("base", "Base model: give a directory or a Hub repo id (org/name)")
        if not self.adapters:
            raise FormError("adapters", "Adapters: give at least one adapter directory, one a line (path[:weight])")
        if not self.output:
            raise FormError("output", "Output: give the directory (or, for GGUF, the .gguf file) to write")
        if self.format not in ("safetensors", "gguf"):
            raise FormError("format", f"Format: {self.format!r} is not safetensors or gguf")
        if (self.format == "gguf") != self.output.endswith(".gguf"):
            raise FormError("output", "Output: a GGUF output is one file ending in .gguf; a safetensors output is a "
                                      "directory (not ending in .gguf)")
        allowed = DTYPE_CHOICES if self.format == "gguf" else [d for d in DTYPE_CHOICES if d not in GGUF_ONLY]
        if self.dtype not in allowed:
            raise FormError("dtype", f"Output dtype: {self.dtype!r} is not one of {', '.join(allowed)}")

    def argv(self, *, device: bool = True) -> list[str]:
        """The merge's arguments, as the command line takes them (``device=False``: plan's, which has none)."""
        out = ["--base", self.base]
        for a in self.adapters:
            out += ["--adapter", a]
        out += ["--output", self.output, "--dtype", self.dtype, "--max-mem", self.max_mem]
        out += ["--device", self.device] if device else []
        out += [x for p in self.include for x in ("--include", p)] + [x for p in self.exclude for x in ("--exclude", p)]
        if self.tokenizer:
            out += ["--tokenizer", self.tokenizer]
        if self.gguf_pre:
            out += ["--gguf-pre", self.gguf_pre]
        return out + (["--overwrite"] if self.overwrite else [])


@dataclass
class Job:
    id: str
    form: dict[str, Any]
    argv: list[str]
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    attempts: int = 0
    pid: int | None = None
    exit_code: int | None = None
    error: str | None = None
    report: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    cancel_requested: bool = False

    @property
    def command(self) -> str:
        return "streammerge " + shlex.join(self.argv)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "command": self.command}


def field_of(message: str) -> str:
    """Which form field a CLI error line is about (the page shows it beside that field)."""
    rules = [("--max-mem", "max_mem"), ("--dtype", "dtype"), ("--device", "device"), ("--tokenizer", "tokenizer"),
             ("--gguf-pre", "gguf_pre"), ("--include", "include"), ("--exclude", "exclude"), ("--output", "output"),
             ("GGUF: ", "output"), ("adapter", "adapters"), ("base", "base")]
    lower = message.lower()
    return next((name for key, name in rules if key.lower() in lower), "base")


class JobStore:
    """The history in ``root`` and the FIFO runner (one job at a time, each in its own process group)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Condition()
        self._queue: list[str] = []
        self._process: subprocess.Popen | None = None
        self._stop = False
        for path in sorted(root.glob("*/job.json"), key=lambda p: p.stat().st_mtime):
            job = Job(**json.loads(path.read_text(encoding="utf-8")))
            if job.state == "running":  # (the server stopped while it ran)
                job.state, job.error, job.pid = "failed", "the server stopped while this job ran; Resume continues it", None
                self._save(job)
            self.jobs[job.id] = job
            if job.state == "queued":
                self._queue.append(job.id)
        self._thread = threading.Thread(target=self._run, name="streammerge-ui-runner", daemon=True)
        self._thread.start()

    # history
    def events_path(self, job_id: str) -> Path:
        return self.root / job_id / "events.jsonl"

    def _save(self, job: Job) -> None:
        folder = self.root / job.id
        folder.mkdir(exist_ok=True)
        tmp = folder / "job.json.tmp"
        tmp.write_text(json.dumps(asdict(job), indent=1, default=str), encoding="utf-8")
        os.replace(tmp, folder / "job.json")

    def _event(self, job_id: str, kind: str, **data: Any) -> None:
        with open(self.events_path(job_id), "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, "time": round(time.time(), 3), **data}) + "\n")

    def _set(self, job: Job, state: str, **changes: Any) -> None:
        for k, v in {"state": state, **changes}.items():
            setattr(job, k, v)
        self._save(job)
        self._event(job.id, "state", state=state, error=job.error)
        with self._lock:
            self._lock.notify_all()

    # actions
    def submit(self, form: Form) -> Job:
        job = Job(uuid.uuid4().hex[:12], asdict(form), form.argv())
        self.jobs[job.id] = job
        self._save(job)
        self._event(job.id, "state", state="queued", error=None)
        with self._lock:
            self._queue.append(job.id)
            self._lock.notify_all()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.jobs[job_id]
        with self._lock:
            if job.state == "queued":
                self._queue.remove(job_id)
                self._set(job, "cancelled", ended=time.time())
            elif job.state == "running" and job.pid:
                job.cancel_requested = True
                os.killpg(job.pid, signal.SIGTERM)  # (its own group: start_new_session)
        return job

    def resume(self, job_id: str) -> Job:
        job = self.jobs[job_id]
        if job.state not in ("failed", "cancelled"):
            raise FormError("job", f"job {job_id} is {job.state}: only a failed or cancelled job is resumed")
        with self._lock:
            self._set(job, "queued", error=None, exit_code=None, cancel_requested=False, ended=None)
            self._queue.append(job_id)
        return job

    def close(self) -> None:
        """Stop taking jobs; a running one is cancelled (its shards kept)."""
        self._stop = True
        for job in self.jobs.values():
            if job.state == "running" and job.pid:
                job.cancel_requested = True
                os.killpg(job.pid, signal.SIGTERM)
        with self._lock:
            self._lock.notify_all()
        self._thread.join(timeout=30)

    # the runner
    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                while not self._queue and not self._stop:
                    self._lock.wait(timeout=1.0)
                if self._stop:
                    return
                job = self.jobs[self._queue.pop(0)]
            self._execute(job)

    def _execute(self, job: Job) -> None:
        cmd = [sys.executable, "-m", "streammerge", *job.argv, "--progress", "json", "--json"]
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True, stdin=subprocess.DEVNULL)
        self._set(job, "running", pid=process.pid, started=time.time(), attempts=job.attempts + 1)
        sampler = threading.Thread(target=self._sample, args=(job, process), daemon=True)
        sampler.start()
        chunks: list[str] = []  # (stdout read beside stderr: neither pipe may fill while the other is read)
        reader = threading.Thread(target=lambda: chunks.append(process.stdout.read() if process.stdout else ""),
                                  daemon=True)
        reader.start()
        failed = None
        for line in process.stderr or []:
            line = line.rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                failed = event.get("error", failed) if event["event"] == "failed" else failed
                with open(self.events_path(job.id), "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            elif line.strip():
                self._event(job.id, "log", text=line)
        code = process.wait()
        reader.join()
        sampler.join()
        stdout = "".join(chunks)
        try:
            result = json.loads(stdout) if stdout.strip() else {}
        except ValueError:
            result = {}
        report = (result.get("outputs") or [None])[0]
        state = "finished" if code == 0 else "cancelled" if job.cancel_requested else "failed"
        self._set(job, state, pid=None, exit_code=code, ended=time.time(), report=report,
                  error=None if code == 0 else result.get("error") or failed or f"exit code {code}")

    def _sample(self, job: Job, process: subprocess.Popen) -> None:
        """The job's RSS every MEMORY_EVERY seconds, as ``memory`` events (the page's live peak)."""
        import psutil

        peak = 0
        try:
            proc = psutil.Process(process.pid)
            while process.poll() is None:
                rss = proc.memory_info().rss
                peak = max(peak, rss)
                self._event(job.id, "memory", rss=rss, peak=peak)
                time.sleep(MEMORY_EVERY)
        except psutil.Error:
            pass

    def verify(self, job_id: str) -> dict[str, Any]:
        """``streammerge verify`` of a finished job's output, with its inputs named."""
        job = self.jobs[job_id]
        if job.state != "finished":
            raise FormError("job", f"job {job_id} is {job.state}: only a finished job is verified")
        form = Form(**job.form)
        cmd = [sys.executable, "-m", "streammerge", "verify", "--base", form.base]
        for a in form.adapters:
            cmd += ["--adapter", a]
        done = subprocess.run([*cmd, form.output, "--json"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        try:
            result = json.loads(done.stdout)
        except ValueError:
            result = {"ok": False, "error": (done.stderr.strip().splitlines() or ["verify failed"])[-1]}
        job.verify = result
        self._save(job)
        return result
