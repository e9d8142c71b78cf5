"""Benchmark: what a Ray cluster on this machine costs against a local run of the same jobs.

Uses bench_merge.py's Llama-8B-shaped checkpoint (real layer sizes, --layers of them) and r=16
adapters, and times, as command-line subprocesses on the same files:
  - N adapters -> N outputs: one local pass (``--batch``) against ``--batch --ray local --ray-group G``
    (Ray started by the command, on 127.0.0.1; its start is part of the time);
  - one output: a local merge against ``--ray local --ray-shards``;
  - Ray's start and stop alone (``ray.init`` / ``ray.shutdown`` on this machine).
Every output is checked byte-identical (but the manifest) to its local run. Prints a Markdown table;
with --results, appends it to that file with the machine described.

    python benchmarks/bench_ray.py --workdir /tmp/bench-ray --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import machine, timed, write_adapter, write_inputs  # noqa: E402


def digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and p.name != "streammerge.json"}


def ray_start_stop() -> float:
    code = ("import os, time; os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER='0', RAY_USAGE_STATS_ENABLED='0');"
            "t = time.perf_counter(); import ray; ray.init(_node_ip_address='127.0.0.1', include_dashboard=False);"
            "ray.shutdown(); print(time.perf_counter() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench-ray"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--group", type=int, default=2)
    ap.add_argument("--max-mem", default="1GB")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()

    base, first = write_inputs(args.workdir / "inputs", args.layers)
    adapters = [first] + [write_adapter(args.workdir / "inputs" / f"adapter{i}", args.layers, seed=i + 1)
                          for i in range(1, args.adapters)]
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    common = ["--base", str(base), "--device", "cpu", "--max-mem", args.max_mem, "--json", "-q"]
    runs: dict[str, list[tuple[float, int]]] = {}
    outputs: dict[str, list[Path]] = {}

    def run(name: str, outs: list[Path], extra: list[str]) -> None:
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
        seconds, rss, stdout = timed([sys.executable, "-m", "streammerge", *common, *extra])
        worker_peak = max(r["peak_rss"] for r in json.loads(stdout)["outputs"])
        runs.setdefault(name, []).append((seconds, max(rss, worker_peak)))
        outputs[name] = outs

    batch = args.workdir / "jobs.json"
    jobs = [{"output": str(args.workdir / "out" / f"o{i}"), "adapters": [str(a)]} for i, a in enumerate(adapters)]
    batch.write_text(json.dumps(jobs))
    ray_jobs = args.workdir / "ray-jobs.json"
    ray_jobs.write_text(json.dumps([{**j, "output": j["output"] + "-ray"} for j in jobs]))
    outs = [Path(j["output"]) for j in jobs]
    one, spread = args.workdir / "out" / "one", args.workdir / "out" / "one-ray"
    for _ in range(args.repeat):
        run("batch, local (one pass)", outs, ["--batch", str(batch)])
        run(f"batch, --ray local --ray-group {args.group}", [Path(str(o) + "-ray") for o in outs],
            ["--batch", str(ray_jobs), "--ray", "local", "--ray-group", str(args.group)])
        run("one output, local", [one], ["--adapter", str(first), "--output", str(one)])
        run("one output, --ray local --ray-shards", [spread],
            ["--adapter", str(first), "--output", str(spread), "--ray", "local", "--ray-shards"])
    for o in outs:
        assert digest(o) == digest(Path(str(o) + "-ray")), f"{o}: the Ray batch output differs from the local one"
    assert digest(one) == digest(spread), "the spread output differs from the local one"
    startup = statistics.median(ray_start_stop() for _ in range(args.repeat))

    local = {"batch": statistics.median(s for s, _ in runs["batch, local (one pass)"]),
             "one": statistics.median(s for s, _ in runs["one output, local"])}
    lines = [f"{args.adapters} adapters (r=16) into a {size / 1e9:.2f} GB base ({args.layers} Llama-8B layers), "
             f"--max-mem {args.max_mem}, medians of {args.repeat}; every Ray output byte-identical to the local one "
             "(but the manifest)", "",
             "| run | seconds | vs local | peak RSS of one process (MiB) |", "|---|---|---|---|"]
    for name, values in runs.items():
        seconds = statistics.median(s for s, _ in values)
        ref = local["batch" if name.startswith("batch") else "one"]
        rss = max(r for _, r in values)
        lines.append(f"| {name} | {seconds:.1f} | {seconds / ref:.2f}x | {rss / 2**20:.0f} |")
    lines += ["", f"Ray's own start and stop on this machine: {startup:.1f} s (median)."]
    table = "\n".join(lines)
    print(table)
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(f"\n## Ray on one machine ({time.strftime('%Y-%m-%d')}, bench_ray.py)\n\nMachine: {machine()}\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
