"""Benchmark: merging into quantized bases, per scheme, against `cp -r` of the same (quantized) files.

For each scheme a base of LAYERS Llama-8B-shaped decoder layers (hidden 4096, MLP 14336, GQA 8 KV
heads) is written with random codes and scales in the scheme's own layout (block FP8, GPTQ with
act-order, AWQ gemm, compressed-tensors pack-quantized W4A16, bitsandbytes nf4 with double
quantization through bitsandbytes itself), plus an r=16 LoRA on every projection. Then, in shuffled
rounds: `cp -r` of the base (+ sync), and streammerge into bf16 (and, for FP8, written back with
--dtype fp8). The 16-bit output is ~4x a 4-bit input (2x an FP8 one), so the ratio to `cp` of the
input is not a copy speed: the table gives the bytes in and out too.

    python benchmarks/bench_quantized.py --workdir /tmp/benchq --repeat 3 --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import machine, sync, timed  # noqa: E402

HIDDEN, INTER, KV, RANK = 4096, 14336, 1024, 16
GROUP = 128


def projections(layers: int) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        out |= {f"{p}.self_attn.q_proj": (HIDDEN, HIDDEN), f"{p}.self_attn.k_proj": (KV, HIDDEN),
                f"{p}.self_attn.v_proj": (KV, HIDDEN), f"{p}.self_attn.o_proj": (HIDDEN, HIDDEN),
                f"{p}.mlp.gate_proj": (INTER, HIDDEN), f"{p}.mlp.up_proj": (INTER, HIDDEN),
                f"{p}.mlp.down_proj": (HIDDEN, INTER)}
    return out


def words(shape: tuple[int, int], gen) -> object:
    import torch

    return torch.randint(-2**31, 2**31 - 1, shape, generator=gen, dtype=torch.int32)


def layer_tensors(scheme: str, module: str, n: int, k: int, gen) -> dict[str, object]:
    """One projection's tensors in ``scheme``'s layout (random codes, plausible scales)."""
    import torch

    g = k // GROUP
    scales = (torch.rand(g, n, generator=gen) * 1e-3 + 1e-4).half()
    if scheme == "fp8":
        q = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        return {f"{module}.weight": q, f"{module}.weight_scale_inv": torch.rand(n // 128, k // 128, generator=gen) * 1e-4}
    if scheme == "gptq":
        return {f"{module}.qweight": words((k // 8, n), gen), f"{module}.qzeros": words((g, n // 8), gen),
                f"{module}.scales": scales, f"{module}.g_idx": (torch.randperm(k, generator=gen) // GROUP).int()}
    if scheme == "awq":
        return {f"{module}.qweight": words((k, n // 8), gen), f"{module}.qzeros": words((g, n // 8), gen),
                f"{module}.scales": scales}
    if scheme == "pack-quantized":
        return {f"{module}.weight_packed": words((n, k // 8), gen), f"{module}.weight_scale": scales.T.contiguous(),
                f"{module}.weight_shape": torch.tensor([n, k])}
    from bitsandbytes.functional import quantize_4bit  # bnb-nf4

    w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    q, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True, quant_storage=torch.uint8)
    return {f"{module}.weight": q, **{f"{module}.weight.{key}": v for key, v in state.as_dict(packed=True).items()}}


QCONFIGS = {
    "fp8": {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": True, "checkpoint_format": "gptq"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
    "pack-quantized": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                       "strategy": "group", "group_size": GROUP}}}},
    "bnb-nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"},
}


def write_base(root: Path, scheme: str, layers: int) -> Path:
    """One shard per layer (+ norms), the scheme's config; reused when already written."""
    import torch
    from safetensors.torch import save_file

    base = root / scheme
    if (base / "model.safetensors.index.json").exists():
        return base
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    gen, weight_map = torch.Generator().manual_seed(0), {}
    for i in range(layers):
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {f"model.layers.{i}.input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}
        for module, (n, k) in projections(layers).items():
            if module.startswith(f"model.layers.{i}."):
                tensors |= layer_tensors(scheme, module, n, k, gen)
        save_file(tensors, base / shard, metadata={"format": "pt"})
        weight_map |= {name: shard for name in tensors}
    total = sum((base / s).stat().st_size for s in set(weight_map.values()))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16",
                                                  "quantization_config": QCONFIGS[scheme]}))
    return base


def write_adapter(root: Path, layers: int) -> Path:
    import torch
    from safetensors.torch import save_file

    adapter = root / "adapter"
    if (adapter / "adapter_config.json").exists():
        return adapter
    adapter.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    lora = {}
    for module, (n, k) in projections(layers).items():
        lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, k, generator=gen) * 0.01
        lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n, RANK, generator=gen) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK}))
    return adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-mem", default="1GB")
    ap.add_argument("--schemes", nargs="+", default=list(QCONFIGS))
    ap.add_argument("--results", type=Path)
    args = ap.parse_args()
    adapter = write_adapter(args.workdir, args.layers)
    runs: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    commands = []
    for scheme in args.schemes:
        base = write_base(args.workdir, scheme, args.layers)
        commands.append((f"cp -r {scheme} && sync", scheme, None))
        commands.append((f"streammerge {scheme} -> bf16", scheme, "auto"))
        if scheme == "fp8":
            commands.append(("streammerge fp8 -> fp8 (--dtype fp8)", scheme, "fp8"))
    rng = random.Random(0)
    for _ in range(args.repeat):
        rng.shuffle(commands)
        for label, scheme, dtype in commands:
            out = args.workdir / "out"
            shutil.rmtree(out, ignore_errors=True)
            sync()
            base = args.workdir / scheme
            if dtype is None:
                seconds, peak, _ = timed(["bash", "-c", f"cp -r {base} {out} && sync"])
            else:
                seconds, peak, stdout = timed([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter",
                                               str(adapter), "--output", str(out), "--max-mem", args.max_mem,
                                               "--dtype", dtype, "--json", "-q", "--device", "cpu"])
                report = json.loads(stdout)["outputs"][0]
                notes[label] = (f"{report['bytes_written'] / 2**20:.0f} MiB out; own peak "
                                f"{report['peak_rss'] / 2**20:.0f} MiB = baseline {report['baseline_rss'] / 2**20:.0f} + "
                                f"{(report['peak_rss'] - report['baseline_rss']) / 2**20:.0f} MiB")
            runs.setdefault(label, []).append(seconds)
    lines = [f"Machine: {machine()}.", "",
             "| run | median s | vs cp -r && sync of its base | base MiB | all runs, s | notes |",
             "|---|---:|---:|---:|---|---|"]
    for label in sorted(runs, key=lambda s: (s.split()[1] if s.startswith("cp") else s.split()[1], s)):
        scheme = label.split()[2] if label.startswith("cp") else label.split()[1]
        floor = statistics.median(runs[f"cp -r {scheme} && sync"])
        size = sum(p.stat().st_size for p in (args.workdir / scheme).iterdir()) / 2**20
        median = statistics.median(runs[label])
        lines.append(f"| {label} | {median:.2f} | {median / floor:.2f}x | {size:.0f} | "
                     f"{' '.join(f'{s:.1f}' for s in runs[label])} | {notes.get(label, '')} |")
    table = "\n".join(lines)
    print(table)
    if args.results:
        with args.results.open("a") as f:
            f.write(f"\n### Quantized bases: `python benchmarks/bench_quantized.py --workdir {args.workdir} --layers "
                    f"{args.layers} --repeat {args.repeat} --max-mem {args.max_mem}`\n\n{table}\n")


if __name__ == "__main__":
    main()
