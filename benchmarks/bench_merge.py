"""Benchmark: streammerge on a Llama-8B-shaped checkpoint against `cp -r` and PEFT merge_and_unload.

Writes a checkpoint with Llama-3-8B's real layer sizes (hidden 4096, MLP 14336, vocab 128256,
GQA 8 KV heads) but only a few layers (default 4, about 3.9 GB in bf16), and an r=16 LoRA on all
seven linear projections, then times in one session, on the same files:
  - cp -r of the base, and cp -r followed by sync (streammerge fsyncs every shard it writes);
  - streammerge on the CPU at each --budget (and once with --no-checksum), as a subprocess, with
    its own peak-RSS reading and an outside psutil sample of the child's RSS;
  - PEFT merge_and_unload + save_pretrained, when transformers and peft are installed;
  - with --adapters N: N adapters -> N outputs in one streammerge pass, against N separate runs.
With --cold, the base is dropped from the page cache before every command (as for a model larger
than RAM), and the bytes each command read from the disk are counted (/sys/block/<dev>/stat).
Prints a Markdown table; with --results, appends it to that file with the machine described.

    python benchmarks/bench_merge.py --workdir /tmp/bench --budgets 1GB --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 4096, 14336, 128256, 32, 8
RANK, ALPHA = 16, 32
SHARD_BYTES = 2 * 1024**3


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    kv = KV_HEADS * (HIDDEN // HEADS)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}"
        out |= {f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN), f"{p}.self_attn.k_proj.weight": (kv, HIDDEN),
                f"{p}.self_attn.v_proj.weight": (kv, HIDDEN), f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN), f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
                f"{p}.mlp.down_proj.weight": (HIDDEN, INTER), f"{p}.input_layernorm.weight": (HIDDEN,),
                f"{p}.post_attention_layernorm.weight": (HIDDEN,)}
    out |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    return out


def write_adapter(adapter: Path, layers: int, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    if (adapter / "adapter_config.json").exists():
        return adapter
    adapter.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, shape in shapes(layers).items():
        if name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, shape[1], generator=gen) * 0.01
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], RANK, generator=gen) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": ["q_proj", "k_proj", "v_proj",
        "o_proj", "gate_proj", "up_proj", "down_proj"], "bias": "none", "task_type": "CAUSAL_LM"}))
    return adapter


def evict(base: Path) -> None:
    """Drop the base's (clean) pages from the page cache: the next reader goes to the disk."""
    for path in base.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_bytes(path: Path) -> int | None:
    """Bytes read so far from the block device holding ``path`` (whole device: keep the machine idle)."""
    dev = os.stat(path).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    stat = sysfs / "stat" if (sysfs / "stat").exists() else None
    if stat is None:
        return None
    return int(stat.read_text().split()[2]) * 512


def write_inputs(root: Path, layers: int) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    base, adapter = root / "base", root / "adapter"
    if (base / "model.safetensors.index.json").exists() and (adapter / "adapter_config.json").exists():
        return base, adapter
    shutil.rmtree(root, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    gen = torch.Generator().manual_seed(0)
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes(layers).items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if size and size + nbytes > SHARD_BYTES:
            groups.append({})
            size = 0
        groups[-1][name] = shape
        size += nbytes
    weight_map = {}
    for i, group in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in group.items()}
        save_file(tensors, base / shard, metadata={"format": "pt"})
        weight_map |= {n: shard for n in group}
        del tensors
    total = sum((base / s).stat().st_size for s in set(weight_map.values()))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "rope_theta": 500000.0}
    (base / "config.json").write_text(json.dumps(config, indent=2))
    write_adapter(adapter, layers, seed=1)
    return base, adapter


def sync() -> None:
    subprocess.run(["sync"], check=True)


def timed(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS sampled from outside (bytes), stdout."""
    import psutil

    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.01)
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {stderr.strip()[-500:]}")
    return seconds, peak, stdout


PEFT_SCRIPT = """
import sys, torch, transformers, peft
base, adapter, out = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size="2GB")
"""


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    import psutil
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, no GPU used")


def many_runs(args: argparse.Namespace, base: Path) -> list[tuple[str, object, bool]]:
    """N adapters: one streammerge pass writing N outputs, and N separate streammerge runs in a row."""
    n, budget = args.adapters, args.budgets[0]
    adapters = [args.workdir / "adapter"] + [write_adapter(args.workdir / f"adapter-{i}", args.layers, seed=1 + i)
                                              for i in range(1, n)]
    common = ["--device", "cpu", "--max-mem", budget, "-q"]

    def one_pass(*extra: str):
        def cmd(out: Path) -> list[str]:
            pairs = [x for i, a in enumerate(adapters) for x in ("--adapter", str(a), "--output", str(out / str(i)))]
            return [sys.executable, "-m", "streammerge", "--base", str(base), *pairs, *common, "--json", *extra]
        return cmd

    # With --cold every separate run starts cold, as it would with a base larger than the page cache.
    evict_cmd = f"{sys.executable} {Path(__file__).resolve()} --evict {base}" if args.cold else "true"

    def separate(out: Path) -> list[str]:
        cmds = [" ".join([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(a), "--output",
                          str(out / str(i)), *common]) for i, a in enumerate(adapters)]
        return ["sh", "-c", " && ".join(f"{evict_cmd} && {c}" for c in cmds)]

    def copies(out: Path) -> list[str]:  # N durable copies of the base with cp, no computation
        return ["sh", "-c", f"mkdir -p {out} && " + " && ".join(f"cp -r {base} {out / str(i)}" for i in range(n))]

    return [(f"streammerge {n} adapters -> {n} outputs, one pass", one_pass(), False),
            (f"streammerge {n} adapters -> {n} outputs, one pass --no-checksum", one_pass("--no-checksum"), False),
            (f"streammerge {n} adapters, {n} separate runs", separate, False),
            (f"{n} x cp -r, then sync", copies, True)]


def main() -> None:
    if sys.argv[1:2] == ["--evict"]:
        evict(Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench-work"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--budgets", nargs="+", default=["1GB"])
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement (median reported)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled run order")
    ap.add_argument("--results", type=Path, help="append the table to this Markdown file")
    ap.add_argument("--adapters", type=int, default=1, help="N > 1: also N adapters in one pass vs N separate runs")
    ap.add_argument("--cold", action="store_true", help="evict the base from the page cache before every command")
    ap.add_argument("--only-many", action="store_true", help="with --adapters: skip the budget and PEFT rows")
    args = ap.parse_args()

    base, adapter = write_inputs(args.workdir, args.layers)
    size = sum(p.stat().st_size for p in base.iterdir())

    def merge_cmd(budget: str, *extra: str):
        return lambda out: [sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter),
                            "--output", str(out), "--device", "cpu", "--max-mem", budget, "--json", "-q", *extra]

    runs: list[tuple[str, object, bool]] = [("cp -r", lambda out: ["cp", "-r", str(base), str(out)], False),
                                            ("cp -r && sync", lambda out: ["cp", "-r", str(base), str(out)], True)]
    if args.adapters > 1:
        runs += many_runs(args, base)
    if args.only_many:
        runs = runs[:2] + [(f"streammerge --max-mem {args.budgets[0]}", merge_cmd(args.budgets[0]), False),
                           (f"streammerge --max-mem {args.budgets[0]} --no-checksum",
                            merge_cmd(args.budgets[0], "--no-checksum"), False)] + runs[2:]
    else:
        runs += [(f"streammerge --max-mem {b}", merge_cmd(b), False) for b in args.budgets]
        runs.append((f"streammerge --max-mem {args.budgets[0]} --no-checksum", merge_cmd(args.budgets[0], "--no-checksum"), False))
    if not args.no_peft and not args.only_many:
        try:
            import peft  # noqa: F401
            import transformers  # noqa: F401

            runs.append(("PEFT merge_and_unload + save_pretrained",
                         lambda out: [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)], False))
        except ImportError:
            print("PEFT not installed: skipped", file=sys.stderr)
    # Rounds in a shuffled order, so that neither slow phases of the disk nor the run before
    # (this disk is slower right after some writers) favour one command; medians reported.
    seconds: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    peaks: dict[str, list[int]] = {label: [] for label, _, _ in runs}
    reads: dict[str, list[int]] = {label: [] for label, _, _ in runs}
    notes: dict[str, str] = {"cp -r": "page cache only (not durable)", "cp -r && sync": "durable",
                             "PEFT merge_and_unload + save_pretrained": "whole model in RAM"}
    rng = random.Random(args.seed)
    for _ in range(args.repeat):
        for label, make_cmd, then_sync in rng.sample(runs, len(runs)):
            out = args.workdir / "out"
            shutil.rmtree(out, ignore_errors=True)
            sync()
            if args.cold:
                evict(base)
            read0 = disk_read_bytes(args.workdir)
            took, peak, stdout = timed(make_cmd(out))
            read1 = disk_read_bytes(args.workdir)
            if read0 is not None and read1 is not None:
                reads[label].append(read1 - read0)
            if then_sync:
                t0 = time.perf_counter()
                sync()
                took += time.perf_counter() - t0
            seconds[label].append(took)
            peaks[label].append(peak)
            if label.endswith("x cp -r, then sync"):
                notes[label] = f"durable; {args.adapters} plain copies of the base, no computation, writeback left to the kernel"
            elif "separate runs" in label:
                notes[label] = "durable; the peak RSS column is the shell's, each run is as the 1-adapter row"
            elif label.startswith("streammerge"):
                r = json.loads(stdout)["outputs"][0]  # {"exit_code": 0, "outputs": [report, ...]}
                notes[label] = (f"durable (fsync){'' if 'no-checksum' in label else ', sha256 of every shard'}; own peak {r['peak_rss'] / 2**20:.0f} MiB = baseline "
                                f"{r['baseline_rss'] / 2**20:.0f} + {(r['peak_rss'] - r['baseline_rss']) / 2**20:.0f} MiB")
    shutil.rmtree(args.workdir / "out", ignore_errors=True)
    cp, cp_sync = statistics.median(seconds["cp -r"]), statistics.median(seconds["cp -r && sync"])
    rows = [(label, statistics.median(seconds[label]), max(peaks[label]), notes.get(label, ""),
             " ".join(f"{t:.1f}" for t in seconds[label])) for label, _, _ in runs]
    read_note = {label: f"; read from disk: median {statistics.median(r) / 1e9:.2f} GB" for label, r in reads.items() if r}
    rows = [(label, m, p, n + (read_note.get(label, "") if args.cold else ""), e) for label, m, p, n, e in rows]
    if args.adapters > 1:  # the yardstick for N outputs: one single-adapter run
        single = f"streammerge --max-mem {args.budgets[0]}"
        one, one_nc = statistics.median(seconds[single]), statistics.median(seconds[single + " --no-checksum"])

        def versus(label: str, m: float) -> str:
            if not ("adapters" in label or label.endswith("then sync")):
                return ""
            if "no-checksum" in label:
                return f"; {m / one_nc:.2f}x one single-adapter run without checksums"
            return f"; {m / one:.2f}x one single-adapter run"
        rows = [(label, m, p, n + versus(label, m), e) for label, m, p, n, e in rows]

    lines = [f"### {time.strftime('%Y-%m-%d')}: Llama-8B-shaped, {args.layers} layers, {size / 1e9:.2f} GB bf16, "
             f"r={RANK} all-linear, median of {args.repeat} rounds in shuffled order (seed {args.seed})"
             f"{', base evicted from the page cache before every command' if args.cold else ''}",
             "", f"Machine: {machine()}.", "",
             "| run | median s | vs cp -r | vs cp -r && sync | peak RSS (sampled) | all runs, s | notes |",
             "|---|---:|---:|---:|---:|---|---|"]
    for label, median, peak, note, each in rows:
        lines.append(f"| {label} | {median:.2f} | {median / cp:.2f}x | {median / cp_sync:.2f}x | "
                     f"{peak / 2**20:.0f} MiB | {each} | {note} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
