"""Opt-in: record the sha256 of every finished output each test leaves behind, to prove that a
refactor writes byte-identical files. ``STREAMMERGE_DIGESTS=before.json python -m pytest`` on the
old code, the same with ``after.json`` on the new, then ``python tests/digests.py before.json
after.json`` lists the outputs that differ. Weight files and the index are compared; the manifest
(timestamps, absolute paths) is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

_FILE = os.environ.get("STREAMMERGE_DIGESTS")
__all__ = ["record_outputs", "pytest_sessionfinish"] if _FILE else []
_seen: dict[str, dict[str, str]] = {}


def _digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".index.json"))}


if _FILE:
    @pytest.fixture(autouse=True)
    def record_outputs(request: pytest.FixtureRequest, tmp_path: Path):
        yield
        for manifest in sorted(tmp_path.rglob("streammerge.json")):
            rel = manifest.parent.relative_to(tmp_path)
            _seen[f"{request.node.nodeid}::{rel}"] = _digest(manifest.parent)

    def pytest_sessionfinish(session: pytest.Session) -> None:
        Path(_FILE).write_text(json.dumps(_seen, indent=1, sort_keys=True))


if __name__ == "__main__":
    before, after = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])
    common = sorted(set(before) & set(after))
    differ = [k for k in common if before[k] != after[k]]
    for k in differ:
        print("DIFFERS:", k)
    print(f"{len(common)} outputs in both, {len(differ)} differ; only before: {len(set(before) - set(after))}, "
          f"only after: {len(set(after) - set(before))}")
    sys.exit(1 if differ else 0)
