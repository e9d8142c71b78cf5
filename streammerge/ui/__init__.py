"""``streammerge ui``: a web page to plan, run, watch, cancel, resume and verify merges, served with
FastAPI and uvicorn (the optional extra ``ui``). The page is plain HTML, JavaScript and CSS shipped in
``static/``: no CDN, no fonts, no request to any host but this server. Jobs run one at a time, each in
its own subprocess (``jobs.py``); the API is in ``server.py``.
"""

from __future__ import annotations

import secrets
import signal
import sys
from pathlib import Path

from ..errors import UsageError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(*, host: str, port: int, token: str | None, jobs_dir: Path) -> int:
    """Run the server until interrupted; another host than loopback needs a token."""
    if host not in LOOPBACK and not token:
        raise UsageError(f"ui: --host {host} would let other machines in: give --token TOKEN too (every request must "
                         f"carry it), e.g. --token {secrets.token_urlsafe(16)}")
    try:
        import uvicorn

        from .server import create_app
    except ImportError as exc:
        raise UsageError(f"ui: the web UI needs its extra ({exc.name} is missing): pip install 'streammerge[ui]'") from None
    app = create_app(jobs_dir, token=token)
    link = f"http://{'[' + host + ']' if ':' in host else host}:{port}/" + (f"?token={token}" if token else "")
    print(f"streammerge ui: {link}  (jobs in {jobs_dir}; Ctrl-C stops)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (uvicorn's own handlers shut it down cleanly, not the merge's)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    print("streammerge ui: stopped", file=sys.stderr)
    return 0
