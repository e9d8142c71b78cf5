"""Benchmark: a GGUF in one pass against merge-then-convert (streammerge to safetensors, then
llama.cpp's own convert_hf_to_gguf.py), on bench_merge.py's Llama-8B-shaped checkpoint.

Per GGUF type and round (commands in a shuffled order): `cp` of the base's shards (the floor),
streammerge straight to FILE.gguf, and the two-step route; wall time, peak RSS sampled from outside
(the larger of its two steps for the two-step route) and the disk the route needs at its peak
(the two-step route holds the whole merged checkpoint while it converts). The two GGUF files are
compared byte for byte each time. The base gets a SentencePiece tokenizer trained here (its
vocabulary padded to 128256 by both tools).

The converter is llama.cpp's, from the llama-cpp-python 0.3.36 sdist (tests/gguf_ref.py fetches
and checks it; pass --converter DIR to reuse an extracted one).

    python benchmarks/bench_gguf.py --workdir /tmp/bench --types q8_0 bf16 --repeat 2 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from bench_merge import machine, sync, timed, write_inputs  # noqa: E402


def tokenizer(base: Path, root: Path) -> None:
    if not (base / "tokenizer.model").exists():
        from gguf_ref import with_tokenizer

        with_tokenizer(base, root)


def converter(args: argparse.Namespace) -> Path:
    if args.converter:
        return args.converter
    from gguf_ref import extract_converter

    target = args.workdir / "llama.cpp"
    if not (target / "ref" / "convert_hf_to_gguf.py").exists():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        extract_converter(target)
    return target / "ref"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--types", nargs="+", default=["q8_0", "bf16"])
    p.add_argument("--max-mem", default="1GB")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--converter", type=Path, help="an extracted convert_hf_to_gguf.py's folder (with gguf-py)")
    p.add_argument("--results", type=Path, help="append the table to this Markdown file")
    args = p.parse_args()
    base, adapter = write_inputs(args.workdir, args.layers)
    tokenizer(base, args.workdir)
    ref = converter(args)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    runs: dict[str, list[tuple[float, int, int]]] = {}
    out, keep = args.workdir / "out", args.workdir / "keep"
    keep.mkdir(exist_ok=True)
    identical: dict[str, bool] = {}
    rng = random.Random(0)
    for round_ in range(args.repeat):
        jobs = [("cp", None)] + [(route, t) for t in args.types for route in ("one pass", "merge then convert")]
        rng.shuffle(jobs)
        for route, kind in jobs:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            sync()
            if route == "cp":
                s, peak, _ = timed(["bash", "-c", f"cp {base}/*.safetensors {out}/ && sync"])
                runs.setdefault("cp && sync", []).append((s, peak, size))
                continue
            gguf = out / f"{route.replace(' ', '-')}.gguf"
            if route == "one pass":
                s, peak, _ = timed([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter),
                                    "--output", str(gguf), "--dtype", kind, "--max-mem", args.max_mem, "-q"])
                disk = gguf.stat().st_size
            else:
                merged = out / "merged"
                s1, p1, _ = timed([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter),
                                   "--output", str(merged), "--max-mem", args.max_mem, "-q"])
                s2, p2, _ = timed([sys.executable, str(ref / "convert_hf_to_gguf.py"), str(merged), "--outtype", kind,
                                   "--outfile", str(gguf)])
                sync()  # (the converter does not fsync; streammerge does)
                s, peak = s1 + s2, max(p1, p2)
                disk = gguf.stat().st_size + sum(f.stat().st_size for f in merged.iterdir())
            runs.setdefault(f"{route} {kind}", []).append((s, peak, disk))
            print(f"round {round_ + 1}: {route} {kind}: {s:.1f} s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
            gguf.replace(keep / f"{route.replace(' ', '-')}-{kind}.gguf")  # (compared at the end)
    shutil.rmtree(out, ignore_errors=True)
    from gguf_ref import same_file

    for kind in args.types:  # (tensors byte for byte and the metadata, but general.name / size_label / tags,
        try:  # which name the folders converted: the base's and the merged checkpoint's)
            same_file(keep / f"one-pass-{kind}.gguf", keep / f"merge-then-convert-{kind}.gguf", ref)
            identical[kind] = True
        except AssertionError:
            identical[kind] = False
    shutil.rmtree(keep, ignore_errors=True)
    floor = statistics.median(r[0] for r in runs["cp && sync"])
    lines = [f"### Llama-8B-shaped, {args.layers} layers, {size / 1e9:.2f} GB bf16, r=16 all-linear, --max-mem "
             f"{args.max_mem}, median of {args.repeat} rounds in shuffled order (seed 0)", "",
             f"Machine: {machine()}.", "",
             "| run | median s | vs cp && sync | peak RSS (sampled) | disk at its peak | all runs, s |",
             "|---|---:|---:|---:|---:|---|"]
    for name, values in runs.items():
        median = statistics.median(v[0] for v in values)
        lines.append(f"| {name} | {median:.2f} | {median / floor:.2f}x | {max(v[1] for v in values) / 2**20:.0f} MiB | "
                     f"{max(v[2] for v in values) / 1e9:.2f} GB | {' '.join(f'{v[0]:.1f}' for v in values)} |")
    lines.append("\nThe one-pass file and the converter's, last round, tensors byte for byte and metadata: " +
                 ", ".join(f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in identical.items()) + ".")
    table = "\n".join(lines)
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
