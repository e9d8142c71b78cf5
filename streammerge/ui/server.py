"""The web UI's server: one page (``static/``) and the JSON API it uses, with FastAPI; live updates
by server-sent events. Plans and merges run the command line itself in a subprocess, so the page
shows the CLI's own messages and the jobs are what ``streammerge ...`` would run.

    GET  /                          the page
    GET  /api/info                  devices present, dtypes, GGUF types, version
    POST /api/plan                  {form} -> the plan (exit_code 0) or {error, field}
    POST /api/jobs                  {form} -> the queued job (a plan first: a refusal is a 400)
    GET  /api/jobs                  every job, newest first
    GET  /api/jobs/{id}             one job, with its output's manifest when there is one
    GET  /api/jobs/{id}/events      its events from the start, then live (SSE), until it ends
    POST /api/jobs/{id}/cancel      SIGTERM to its process group (a queued job is dropped)
    POST /api/jobs/{id}/resume      queue a failed or cancelled job again (finished shards kept)
    POST /api/jobs/{id}/verify      ``streammerge verify`` of its output

With a token, every request needs ``Authorization: Bearer TOKEN`` or the cookie set by opening
``/?token=TOKEN``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from .jobs import FINAL, Form, FormError, JobStore, field_of

STATIC = Path(__file__).parent / "static"
COOKIE = "streammerge_token"
POLL = 0.2  # seconds between looks at a running job's event file


def create_app(jobs_dir: Path, *, token: str | None = None) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="streammerge", docs_url=None, redoc_url=None, openapi_url=None)
    store = JobStore(jobs_dir)
    app.state.store = store
    if token is not None:
        _guard(app, token)

    @app.exception_handler(FormError)
    async def form_error(request: Request, exc: FormError) -> Any:
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)

    @app.on_event("shutdown")
    def stop() -> None:
        store.close()

    _page(app)
    _jobs(app, store)
    return app


def _guard(app: Any, token: str) -> None:
    """Every request carries the token (bearer header or cookie); ``/?token=`` sets the cookie."""
    from fastapi import Request
    from fastapi.responses import JSONResponse, RedirectResponse

    @app.middleware("http")
    async def check_token(request: Request, call_next: Any) -> Any:
        given = request.query_params.get("token")
        if given is not None and secrets.compare_digest(given, token) and request.url.path == "/":
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        header = request.headers.get("authorization", "")
        sent = header.removeprefix("Bearer ") if header.startswith("Bearer ") else request.cookies.get(COOKIE, "")
        if not secrets.compare_digest(sent, token):
            return JSONResponse({"error": "a token is needed: open the link printed at start, or send "
                                          "Authorization: Bearer TOKEN"}, status_code=401)
        return await call_next(request)


def _page(app: Any) -> None:
    from fastapi import HTTPException
    from fastapi.responses import FileResponse, Response

    @app.get("/")
    def page() -> Any:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico")
    def favicon() -> Any:
        return Response(status_code=204)

    @app.get("/static/{name}")
    def static(name: str) -> Any:
        path = STATIC / name
        if "/" in name or not path.is_file():
            raise HTTPException(404, name)
        return FileResponse(path)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        from .. import __version__
        from ..formats.gguf_layout import OUTTYPES
        from ..options import DTYPE_CHOICES, GGUF_ONLY

        return {"version": __version__, "devices": devices(), "dtypes": [d for d in DTYPE_CHOICES if d not in GGUF_ONLY],
                "gguf_types": ["auto", *OUTTYPES]}


def _jobs(app: Any, store: JobStore) -> None:
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse

    def job(job_id: str) -> Any:
        if job_id not in store.jobs:
            raise HTTPException(404, f"no job {job_id}")
        return store.jobs[job_id]

    @app.post("/api/plan")
    def plan(form: dict[str, Any]) -> Any:
        return plan_of(Form.parse(form))

    @app.post("/api/jobs")
    def submit(form: dict[str, Any]) -> Any:
        parsed = Form.parse(form)
        planned = plan_of(parsed)
        if isinstance(planned, JSONResponse):  # (refused: nothing queued)
            return planned
        return {**store.submit(parsed).to_dict(), "plan": planned}

    @app.get("/api/jobs")
    def jobs() -> list[dict[str, Any]]:
        return [j.to_dict() for j in sorted(store.jobs.values(), key=lambda j: -j.created)]

    @app.get("/api/jobs/{job_id}")
    def one(job_id: str) -> dict[str, Any]:
        j = job(job_id)
        return {**j.to_dict(), "manifest": manifest(Path(j.form["output"]))}

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str) -> Any:
        return StreamingResponse(follow(store, job(job_id).id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        return store.cancel(job(job_id).id).to_dict()

    @app.post("/api/jobs/{job_id}/resume")
    def resume(job_id: str) -> dict[str, Any]:
        return store.resume(job(job_id).id).to_dict()

    @app.post("/api/jobs/{job_id}/verify")
    def verify(job_id: str) -> dict[str, Any]:
        return store.verify(job(job_id).id)


def plan_of(form: Form) -> Any:
    """``streammerge plan ... --output OUT --json`` for the form: the plan, or its refusal as a 400
    with the CLI's line and the field it is about."""
    from fastapi.responses import JSONResponse

    done = subprocess.run([sys.executable, "-m", "streammerge", "plan", *form.argv(device=False), "--json"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    try:
        doc = json.loads(done.stdout)
    except ValueError:
        doc = {"error": (done.stderr.strip().splitlines() or ["plan failed"])[-1]}
    if done.returncode != 0 or "error" in doc:
        message = str(doc.get("error") or done.stderr.strip()).removeprefix("streammerge: error: ")
        return JSONResponse({"error": message, "field": field_of(message)}, status_code=400)
    return doc


async def follow(store: JobStore, job_id: str) -> Any:
    """Every event of the job from the start, then new ones as they are written, until it has ended."""
    path, offset, pending = store.events_path(job_id), 0, ""
    while True:
        ended = store.jobs[job_id].state in FINAL
        if path.exists():
            with open(path, encoding="utf-8") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.strip():
                    yield f"data: {line}\n\n"
        if ended and not pending:
            yield f"event: end\ndata: {json.dumps(store.jobs[job_id].to_dict(), default=str)}\n\n"
            return
        await asyncio.sleep(POLL)


def manifest(out: Path) -> dict[str, Any] | None:
    from ..output.manifest import MANIFEST_NAME

    path = out / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def devices() -> list[str]:
    """auto, cpu and each CUDA device present (torch asked in a subprocess: the server stays light)."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        count = int(done.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        count = 0
    return ["auto", "cpu", *[f"cuda:{i}" for i in range(count)]]
