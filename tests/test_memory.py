"""Bounded memory: a synthetic checkpoint several times larger than --max-mem, with one tensor
larger than the budget, merges with the peak RSS under the budget plus the interpreter's baseline.

Runs in a subprocess so that the reading is the merge's alone; the child's RSS is also sampled
from outside with psutil as an independent check of the child's own VmHWM reading.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from oracle import reports as oracle_reports
from oracle import exact_and_bound, read_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

BUDGET = 64 * 1000**2  # --max-mem 64MB


def synthetic(root: Path) -> tuple[Path, Path]:
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    gen = torch.Generator().manual_seed(0)
    shards = {
        "model-00001-of-00003.safetensors": {"big.weight": (8192, 8192)},  # 128 MiB bf16, 2x the budget
        "model-00002-of-00003.safetensors": {f"layers.{i}.proj.weight": (4096, 4096) for i in range(3)},
        "model-00003-of-00003.safetensors": {f"layers.{i}.proj.weight": (4096, 4096) for i in range(3, 6)},
    }
    weight_map, lora = {}, {}
    for shard, shapes in shards.items():
        tensors = {n: torch.randn(s, generator=gen).to(torch.bfloat16) for n, s in shapes.items()}
        save_file(tensors, base / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in shapes})
        for n, (out_f, in_f) in shapes.items():
            if n.startswith(("big", "layers.1.", "layers.4.")):
                module = n.removesuffix(".weight")
                lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(16, in_f, generator=gen) * 0.01
                lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, 16, generator=gen) * 0.01
    total = sum((base / s).stat().st_size for s in shards)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (base / "config.json").write_text("{}")
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
    return base, adapter


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The synthetic checkpoint, written once for the module's tests (they only read it)."""
    return synthetic(tmp_path_factory.mktemp("big"))


def run_sampled(cmd: list[str]) -> tuple[str, int]:
    """Run ``cmd``; its stdout and the largest RSS seen from outside (psutil, every 5 ms)."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampled = 0
    proc = psutil.Process(child.pid)
    while child.poll() is None:
        try:
            sampled = max(sampled, proc.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.005)
    stdout, stderr = child.communicate()
    assert child.returncode == 0, stderr
    return stdout, sampled


@pytest.mark.parametrize("outputs", [1, 3])
def test_peak_rss_stays_under_budget(tmp_path: Path, big: tuple[Path, Path], outputs: int) -> None:
    """One output, and three outputs in one pass (they share one set of buffers)."""
    base, adapter = big
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert size > 5 * BUDGET
    outs = [tmp_path / f"out{i}" for i in range(outputs)]
    pairs = [x for o in outs for x in ("--adapter", str(adapter), "--output", str(o))]
    cmd = [sys.executable, "-m", "streammerge", "--base", str(base), *pairs, "--device", "cpu", "--max-mem", "64MB",
           "--json", "-q"]
    stdout, sampled = run_sampled(cmd)
    reports = oracle_reports(stdout)
    assert len(reports) == outputs and all(r["tensors_merged"] == 3 and r["tensors_copied"] == 4 for r in reports)
    report, out = reports[-1], outs[-1]
    baseline, peak = report["baseline_rss"], report["peak_rss"]
    assert peak <= baseline + BUDGET, f"peak {peak} > baseline {baseline} + budget {BUDGET}"
    assert sampled <= baseline + BUDGET, f"sampled {sampled} > baseline {baseline} + budget {BUDGET}"
    # the big tensor really went through in several chunks, and is right
    assert report["chunk_elements"] < 8192 * 8192
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        a, b = (f.get_tensor(f"base_model.model.big.lora_{x}.weight").double() for x in "AB")
    with safe_open(base / "model-00001-of-00003.safetensors", "pt") as f:
        w = f.get_tensor("big.weight")
    got = read_checkpoint(out)["big.weight"]
    rows = slice(0, 8192, 97)  # a spread of rows across every chunk boundary region
    exact, bound = exact_and_bound(w[rows], [(a, b[rows], 2.0)], torch.bfloat16)
    assert ((got[rows].double() - exact).abs() <= bound).all()


def test_verify_stays_small(tmp_path: Path, big: tuple[Path, Path]) -> None:
    """verify reads blocks and rows, never whole tensors: its peak stays small on the same checkpoint."""
    base, adapter = big
    out = tmp_path / "out"
    merge = [sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter), "--output", str(out),
             "--device", "cpu", "--max-mem", "64MB", "-q"]
    subprocess.run(merge, check=True, capture_output=True)
    check = subprocess.run([sys.executable, "-m", "streammerge", "verify", "--base", str(base), "--adapter", str(adapter),
                            "--output", str(out), "--json"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["ok"] and report["tensors_sampled"] == 3 and report["tensors_compared"] == 4
    assert report["peak_rss"] - report["baseline_rss"] <= BUDGET, report


def test_chunk_is_the_budgets_share_capped() -> None:
    from streammerge.run.workingset import MAX_CHUNK, _capped

    assert _capped(10**9, 58_720_256, 4096) == MAX_CHUNK  # a big budget: capped
    assert _capped(10**6, 58_720_256, 4096) == 10**6  # a small budget: its own share
    assert _capped(10**9, 10**5, 4096) == 10**5  # never more than the largest merged tensor
    assert _capped(MAX_CHUNK * 4, MAX_CHUNK * 8, MAX_CHUNK * 2) == MAX_CHUNK * 2  # one row at least


def merge_quantized(tmp_path: Path, tensors: dict[str, torch.Tensor], qconfig: dict,
                    *extra: str) -> tuple[dict, Path, torch.Tensor, torch.Tensor]:
    """An 8192-wide quantized base of ``tensors`` (+ a norm) and an r=16 LoRA on ``big``, merged at
    --max-mem 64MB in a subprocess; the merge's peak and the sampled RSS checked against the budget.
    Returns the report, the output, and the LoRA's A and B (scale 2)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    save_file({**tensors, "norm.weight": torch.ones(8192, dtype=torch.bfloat16)}, base / "model.safetensors",
              metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"quantization_config": qconfig}))
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 8192, generator=gen) * 0.01, torch.randn(8192, 16, generator=gen) * 0.01
    save_file({"base_model.model.big.lora_A.weight": a, "base_model.model.big.lora_B.weight": b},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
    out = tmp_path / "out"
    stdout, sampled = run_sampled([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter),
                                   "--output", str(out), "--device", "cpu", "--max-mem", "64MB", "--json", "-q",
                                   *extra])
    (report,) = oracle_reports(stdout)
    baseline, peak = report["baseline_rss"], report["peak_rss"]
    assert report["quantized"]["tensors"] == 1 and report["chunk_elements"] < 8192 * 8192
    assert peak <= baseline + BUDGET, f"peak {peak} > baseline {baseline} + budget {BUDGET}"
    assert sampled <= baseline + BUDGET, f"sampled {sampled} > baseline {baseline} + budget {BUDGET}"
    return report, out, a, b


@pytest.mark.parametrize("dtype", ["auto", "fp8"])
def test_a_block_fp8_base_stays_under_budget(tmp_path: Path, dtype: str) -> None:
    """A quantized base: an F8_E4M3 weight of 64 MiB (128 MiB once dequantized to bf16), its scales,
    merged at --max-mem 64MB into bf16, or written back as FP8 (re-quantized: W0 kept beside x); the
    scales and the chunk buffers are the working set."""
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(8192, 8192, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(64, 64, generator=gen) * 1e-3 + 1e-4
    report, out, a, b = merge_quantized(tmp_path, {"big.weight": q, "big.weight_scale_inv": scale},
                                        {"quant_method": "fp8", "weight_block_size": [128, 128]}, "--dtype", dtype)
    assert report["quantized"]["scheme"] == "fp8"
    rows = slice(0, 8192, 331)  # rows across the chunks, against q * s[i // 128, j // 128] + 2 B A in float64
    w = q[rows].double() * scale.double()[torch.arange(8192)[rows] // 128][:, torch.arange(8192) // 128]
    exact, bound = exact_and_bound(w, [(a.double(), b[rows].double(), 2.0)], torch.bfloat16)
    got = read_checkpoint(out)
    if dtype == "fp8":  # codes times the new scales: within half an e4m3 step (2^-4 relative) of the merge
        every = got["big.weight_scale_inv"].double()[torch.arange(8192)[rows] // 128][:, torch.arange(8192) // 128]
        assert report["quantized"]["requantized"] == 1 and "big.weight" in report["requantized"]
        assert ((got["big.weight"][rows].double() * every - exact).abs() <= exact.abs() * 2.0**-4 + every * 2.0**-9).all()
        return
    assert ((got["big.weight"][rows].double() - exact).abs() <= bound).all()


def test_a_4bit_base_stays_under_budget(tmp_path: Path) -> None:
    """A bitsandbytes nf4 weight of 8192 x 8192 (32 MiB stored, 128 MiB once dequantized to bf16) with
    double quantization, merged at --max-mem 64MB: its absmax (one float per 64 elements, 4 MiB as
    float32) and the chunk buffers are the working set."""
    functional = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(8192, 8192, generator=gen) * 0.02).to(torch.bfloat16)
    q, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True,
                                        quant_storage=torch.uint8)
    packed = {f"big.weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    report, out, a, b = merge_quantized(tmp_path, {"big.weight": q, **packed}, {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"})
    assert report["quantized"]["scheme"] == "bitsandbytes"
    rows = slice(0, 8192, 331)  # against bitsandbytes' own dequantization + 2 B A, one rounding
    reference = functional.dequantize_4bit(q, state)[rows].double()
    exact, bound = exact_and_bound(reference, [(a.double(), b[rows].double(), 2.0)], torch.bfloat16)
    slack = reference.abs() * 2.0**-8  # the reference is itself rounded to bf16 once: half an ulp of it
    assert ((read_checkpoint(out)["big.weight"][rows].double() - exact).abs() <= bound + slack).all()


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_a_gptq_or_awq_base_stays_under_budget(tmp_path: Path, layout: str) -> None:
    """A 4-bit GPTQ (act-order g_idx) or AWQ weight of 8192 x 8192 (32 MiB stored, 128 MiB once
    dequantized to bf16): both store W transposed, so a row chunk is read as a column range of
    every stored row; merged at --max-mem 64MB. Rows checked against a float64 reading here."""
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (1024, 8192) if layout == "gptq" else (8192, 1024), generator=gen,
                          dtype=torch.int32)
    zeros = torch.randint(-2**31, 2**31 - 1, (64, 1024), generator=gen, dtype=torch.int32)
    scales = (torch.rand(64, 8192, generator=gen) * 1e-3 + 1e-4).half()
    g_idx = torch.randperm(8192, generator=gen) // 128
    side = {"big.qweight": words, "big.qzeros": zeros,
            "big.scales": scales, **({"big.g_idx": g_idx.to(torch.int32)} if layout == "gptq" else {})}
    report, out, a, b = merge_quantized(tmp_path, side, {"quant_method": layout, "bits": 4, "group_size": 128,
                                                         "checkpoint_format": "gptq_v2", "version": "gemm"})
    rows = torch.arange(0, 8192, 331)
    group = g_idx if layout == "gptq" else torch.arange(8192) // 128
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7] if layout == "awq" else list(range(8)))
    position = torch.argsort(order)  # output n % 8 -> its nibble
    z = (zeros.long()[:, rows // 8] >> (4 * position[rows % 8])) & 15  # (G, rows)
    if layout == "gptq":  # word (p, n): W[n, 8p + j] in bits 4j
        q = ((words.long()[:, rows][:, None, :] >> (4 * torch.arange(8))[None, :, None]) & 15).reshape(8192, -1).T
    else:  # word (k, m): W[8m + order[j], k] in bits 4j
        q = ((words.long()[:, rows // 8] >> (4 * position[rows % 8])) & 15).T
    w = (q - z.T[:, group]).double() * scales.double()[:, rows].T[:, group]
    exact, bound = exact_and_bound(w, [(a.double(), b[rows].double(), 2.0)], torch.bfloat16)
    merged = read_checkpoint(out)["big.weight"]  # bf16: the unquantized tensors' dtype (the scales' f16 does not count)
    assert merged.dtype == torch.bfloat16 and ((merged[rows].double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("kind", ["loha", "ia3", "road", "deft", "fourierft"])
def test_other_methods_stay_under_budget(tmp_path: Path, big: tuple[Path, Path], kind: str) -> None:
    """One method of each kind on the 8192 x 8192 weight at --max-mem 64MB: LoHa (additive, two
    products of a block's size as temporaries, counted in the working set), IA3 (multiplicative,
    the input side: every row scaled by the same vector), RoAd (pairs of output rows: chunks of
    whole groups of 64 rows), DEFT (its delta needs relu(P).T @ W over every row: a first pass) and
    FourierFT (dense from a few saved numbers: its locations regenerated without the 67M-element
    permutation, its cos / sin tables over the columns held with the factors)."""
    base, _ = big
    gen = torch.Generator().manual_seed(4)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    if kind == "loha":
        factors = {"hada_w1_a": (8192, 8), "hada_w1_b": (8, 8192), "hada_w2_a": (8192, 8), "hada_w2_b": (8, 8192)}
        config = {"peft_type": "LOHA", "r": 8, "alpha": 16}
    elif kind == "ia3":
        factors, config = {"ia3_l": (1, 8192)}, {"peft_type": "IA3", "feedforward_modules": ["big"]}
    elif kind == "road":
        factors, config = {"road_theta": (8192,), "road_alpha": (8192,)}, {"peft_type": "ROAD", "variant": "road_2",
                                                                          "group_size": 64}
    elif kind == "deft":
        factors, config = {"deft_P": (8192, 8), "deft_R": (8, 8192)}, {"peft_type": "DEFT", "r": 8}
    else:
        factors = {"fourierft_spectrum": (40,)}
        config = {"peft_type": "FOURIERFT", "scaling": 1e8, "random_loc_seed": 3}
    tensors = {f"base_model.model.big.{k}": torch.randn(s, generator=gen) * 0.1 + (1 if kind == "ia3" else 0)
               for k, s in factors.items()}
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    stdout, sampled = run_sampled([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter),
                                   "--output", str(out), "--device", "cpu", "--max-mem", "64MB", "--json", "-q"])
    (report,) = oracle_reports(stdout)
    baseline, peak = report["baseline_rss"], report["peak_rss"]
    assert report["tensors_merged"] == 1 and report["chunk_elements"] < 8192 * 8192
    assert peak <= baseline + BUDGET and sampled <= baseline + BUDGET, (peak, sampled, baseline)
    with safe_open(base / "model-00001-of-00003.safetensors", "pt") as f:
        w = f.get_tensor("big.weight")[::331].double()
    t = {k.rsplit(".", 1)[-1]: v.double() for k, v in tensors.items()}
    if kind == "loha":
        exact = w + 2.0 * (t["hada_w1_a"][::331] @ t["hada_w1_b"]) * (t["hada_w2_a"][::331] @ t["hada_w2_b"])
    elif kind == "ia3":
        exact = w * t["ia3_l"]
    elif kind == "deft":  # W + P (R - relu(P)^T W), relu(P)^T W summed in float64 over blocks of rows
        with safe_open(base / "model-00001-of-00003.safetensors", "pt") as f:
            whole = f.get_tensor("big.weight")
        right = t["deft_P"].clamp(min=0)
        m = sum(right[r : r + 1024].T @ whole[r : r + 1024].double() for r in range(0, 8192, 1024))
        exact = w + t["deft_P"][::331] @ (t["deft_R"] - m)
    elif kind == "fourierft":  # scaling / (M N) sum_k f_k cos(2 pi (u_k r / M + v_k c / N)), torch.randperm's places
        flat = torch.randperm(8192 * 8192, generator=torch.Generator().manual_seed(3))[:40]
        u, v = flat // 8192, flat % 8192
        rows, cols = torch.arange(0, 8192, 331), torch.arange(8192)
        phase = ((torch.outer(rows, u) % 8192).double()[:, None, :] + (torch.outer(cols, v) % 8192).double()[None]) / 8192
        exact = w + 1e8 / 8192**2 * (torch.cos(2 * torch.pi * phase) @ t["fourierft_spectrum"])
    else:  # row i pairs with i + 32 (first half of its group of 64) or i - 32
        rows = torch.arange(0, 8192, 331)
        first = rows % 64 < 32
        partner = torch.where(first, rows + 32, rows - 32)
        with safe_open(base / "model-00001-of-00003.safetensors", "pt") as f:
            other = f.get_tensor("big.weight")[partner].double()
        c, s = t["road_alpha"] * t["road_theta"].cos(), t["road_alpha"] * t["road_theta"].sin()
        exact = c[rows][:, None] * w + torch.where(first, -s[rows], s[rows])[:, None] * other
    got = read_checkpoint(out)["big.weight"][::331].double()
    assert ((got - exact).abs() <= exact.abs() * 2.0**-8 + 1e-6).all()


def test_a_whole_tensor_method_fits_its_budget_or_is_refused(tmp_path: Path, big: tuple[Path, Path]) -> None:
    """OSF decomposes the whole weight (an SVD): at 64MB the 8192 x 8192 weight is refused with the
    budget that would hold it, nothing written; a 1024 x 1024 one merges within the same budget."""
    base, _ = big
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    gen = torch.Generator().manual_seed(6)
    u, s, v = torch.randn(8192, 8, generator=gen), torch.rand(8, generator=gen), torch.randn(8, 8192, generator=gen)
    save_file({"base_model.model.big.osf_svd_params.U_low": u, "base_model.model.big.osf_svd_params.S_low": s,
               "base_model.model.big.osf_svd_params.V_low": v}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "OSF"}))
    out = tmp_path / "out"
    refused = subprocess.run([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter),
                              "--output", str(out), "--device", "cpu", "--max-mem", "64MB"], capture_output=True, text=True)
    assert refused.returncode != 0 and "a whole tensor for OSF" in refused.stderr and "raise --max-mem to at least" \
        in refused.stderr and len(refused.stderr.strip().splitlines()) == 1 and not out.exists()
    small = tmp_path / "small"
    small.mkdir()
    w = torch.randn(1024, 1024, generator=gen).to(torch.bfloat16)
    save_file({"proj.weight": w}, small / "model.safetensors", metadata={"format": "pt"})
    (small / "config.json").write_text("{}")
    save_file({"base_model.model.proj.osf_svd_params.U_low": u[:1024] * 0.01, "base_model.model.proj.osf_svd_params.S_low": s,
               "base_model.model.proj.osf_svd_params.V_low": v[:, :1024] * 0.01}, adapter / "adapter_model.safetensors")
    stdout, sampled = run_sampled([sys.executable, "-m", "streammerge", "--base", str(small), "--adapter", str(adapter),
                                   "--output", str(out), "--device", "cpu", "--max-mem", "64MB", "--json", "-q"])
    (report,) = oracle_reports(stdout)
    assert report["peak_rss"] <= report["baseline_rss"] + BUDGET and sampled <= report["baseline_rss"] + BUDGET
    uu, ss, vt = torch.linalg.svd(w.double(), full_matrices=False)
    exact = (uu[:, :1016] * ss[:1016]) @ vt[:1016] + (u[:1024].double() * 0.01 * s.double()) @ (v[:, :1024].double() * 0.01)
    got = read_checkpoint(out)["proj.weight"].double()
    assert ((got - exact).abs() <= exact.abs() * 2.0**-8 + 1e-3).all()


def test_a_gguf_output_stays_under_budget(tmp_path: Path) -> None:
    """A GGUF output (q8_0) of a Llama-shaped checkpoint 5x the budget whose head (32768 x 2048 bf16,
    128 MiB) is twice it: merged in row chunks and quantized in pieces, the peak RSS within the budget;
    the file is then held against the float64 merge by ``verify``."""
    pytest.importorskip("gguf")
    pytest.importorskip("sentencepiece")
    from gguf_ref import with_tokenizer

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    hidden, ff, vocab, layers = 2048, 4096, 32768, 2
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden // 2, hidden),
                   p + "self_attn.v_proj.weight": (hidden // 2, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (ff, hidden), p + "mlp.up_proj.weight": (ff, hidden),
                   p + "mlp.down_proj.weight": (hidden, ff), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    gen = torch.Generator().manual_seed(0)
    weight_map, lora = {}, {}
    for n, s in shapes.items():
        shard = "model-00001-of-00002.safetensors" if n.startswith(("lm_head", "model.embed")) else \
            "model-00002-of-00002.safetensors"
        weight_map[n] = shard
    for shard in sorted(set(weight_map.values())):
        save_file({n: torch.randn(shapes[n], generator=gen).to(torch.bfloat16) * 0.02 for n in shapes
                   if weight_map[n] == shard}, base / shard, metadata={"format": "pt"})
    for module in ("lm_head", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        out_f, in_f = shapes[module + ".weight"]
        lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(16, in_f, generator=gen) * 0.05
        lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, 16, generator=gen) * 0.05
    total = sum((base / s).stat().st_size for s in set(weight_map.values()))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": ff,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16"}))
    with_tokenizer(base, tmp_path)
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32}))
    assert total > 5 * BUDGET
    out = tmp_path / "out.gguf"
    stdout, sampled = run_sampled([sys.executable, "-m", "streammerge", "--base", str(base), "--adapter", str(adapter),
                                   "--output", str(out), "--dtype", "q8_0", "--max-mem", "64MB", "--json", "-q"])
    (report,) = oracle_reports(stdout)
    baseline, peak = report["baseline_rss"], report["peak_rss"]
    print(f"gguf q8_0: peak {peak - baseline} bytes over the baseline (sampled {sampled - baseline}), budget {BUDGET}")
    assert peak <= baseline + BUDGET and sampled <= baseline + BUDGET, (peak - baseline, sampled - baseline)
    assert report["chunk_elements"] < vocab * hidden and report["tensors_merged"] == 3
    check = subprocess.run([sys.executable, "-m", "streammerge", "verify", "--base", str(base), "--adapter",
                            str(adapter), str(out), "--json"], capture_output=True, text=True)
    assert check.returncode == 0 and json.loads(check.stdout)["ok"], check.stdout + check.stderr
