"""A/B of two checkouts of streammerge on the same files: interleaved, base evicted before each run.

    python benchmarks/ab.py --base BASE --adapter ADAPTER --a OLD_CHECKOUT --b NEW_CHECKOUT [--rounds 3]

Each round runs A then B (or B then A, alternating) as `python -m streammerge` with PYTHONPATH set
to that checkout, `--device cpu --max-mem 1GB`, into a fresh output, and prints wall seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def evict(root: Path) -> None:
    for p in root.rglob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(tree: Path, base: Path, adapter: Path, out: Path, budget: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    evict(base)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter), "--output",
                    str(out), "--device", "cpu", "--max-mem", budget, "-q"], check=True, env=env, cwd=tree)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--a", type=Path, required=True, help="checkout A (e.g. a git worktree of the old commit)")
    p.add_argument("--b", type=Path, required=True, help="checkout B")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", default="1GB")
    p.add_argument("--out", type=Path, default=Path("/tmp/streammerge-ab"))
    args = p.parse_args()
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(args.rounds):
        order = ["A", "B"] if i % 2 == 0 else ["B", "A"]
        for name in order:
            tree = args.a if name == "A" else args.b
            times[name].append(run(tree.resolve(), args.base, args.adapter, args.out / name, args.budget))
            print(f"round {i + 1} {name}: {times[name][-1]:.2f} s", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    for name in ("A", "B"):
        print(f"{name}: median {statistics.median(times[name]):.2f} s, runs {' '.join(f'{t:.2f}' for t in times[name])}")


if __name__ == "__main__":
    main()
