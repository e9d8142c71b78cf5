"""Block FP8 bases (DeepSeek-V3 / Qwen3-FP8 layout: F8_E4M3 weights, ``weight_scale_inv`` per 128x128
block) merged into 16-bit outputs.

The fixture quantizes a tiny real Llama (saved by transformers) itself, with dimensions that are
not multiples of 128 (hidden 192, intermediate 320, k/v 96: partial edge blocks both ways), some
scales in bf16 and one scale in another shard than its weight. The oracle is a float64
dequantization written here (``q * s[i // 128, j // 128]``), not the code under test and not
transformers' FP8 dequantizer (which infers the block size from the grid and is wrong for partial
blocks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from oracle import bits, exact_and_bound, logits, odd_llama, read_checkpoint
from safetensors.torch import save_file

from streammerge.cli import main

BLOCK = 128
QCONFIG = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic", "fmt": "e4m3"}


def quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: s = amax / 448 (1 where the block is zero), q = e4m3(w / s)."""
    n, k = w.shape
    s = torch.ones(math.ceil(n / BLOCK), math.ceil(k / BLOCK), dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            amax = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].double().abs().max()
            s[i, j] = amax / 448 if amax > 0 else 1.0
    s = s.to(scale_dtype)
    q = (w.double() / expand(s.double(), n, k)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def expand(s: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The scale of every element: s[i // 128, j // 128]."""
    return s.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]


def dequant64(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.double() * expand(s.double(), *q.shape)


def make_fp8(root: Path) -> dict:
    """The block FP8 base and its adapter (conftest's session fixture ``fp8``: built once, shared with
    tests/test_gguf_archs.py, which works on copies)."""
    config, peft = odd_llama(root, hidden=192, intermediate=320, dtype="bf16", targets=["q_proj", "v_proj", "down_proj"])
    state = read_checkpoint(root / "bf16")
    shards: dict[str, dict[str, torch.Tensor]] = {"model-00001-of-00002.safetensors": {},
                                                  "model-00002-of-00002.safetensors": {}}
    names, dequantized = sorted(state), {}
    for i, name in enumerate(names):
        shard = list(shards)[0 if i < len(names) // 2 else 1]
        w = state[name]
        if name.endswith("proj.weight"):
            q, s = quantize(w, torch.bfloat16 if "mlp" in name else torch.float32)
            shards[shard][name] = q
            # one scale lives in the other shard (checkpoints do this)
            other = list(shards)[1] if name == "model.layers.0.self_attn.q_proj.weight" else shard
            shards[other][name + "_scale_inv"] = s
            dequantized[name] = dequant64(q, s)
        else:
            shards[shard][name] = w
    base = root / "base"
    base.mkdir()
    for shard, tensors in shards.items():
        save_file(tensors, base / shard, metadata={"format": "pt"})
    weight_map = {n: s for s, tensors in shards.items() for n in tensors}
    total = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    cfg = json.loads((root / "bf16" / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "quantization_config": QCONFIG}))
    return {"base": base, "peft": peft, "state": state, "dequantized": dequantized, "config": config}


def test_block_fp8_merges_into_bf16(tmp_path: Path, fp8: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from streammerge.run import workingset

    monkeypatch.setattr(workingset, "MAX_CHUNK", 1000)  # chunks of a few rows: they start inside blocks
    out = tmp_path / "out"
    assert main(["--base", str(fp8["base"]), "--adapter", str(fp8["peft"].adapter), "--output", str(out), "-q",
                 "--max-mem", "40MB"]) == 0
    got, base = read_checkpoint(out), read_checkpoint(fp8["base"])
    assert set(got) == {n for n in base if not n.endswith("_scale_inv")}  # side tensors gone, names kept
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    deltas = fp8["peft"].deltas
    for name, tensor in got.items():
        module = name.removesuffix(".weight")
        if name in fp8["dequantized"]:
            assert tensor.dtype == torch.bfloat16
            w64 = fp8["dequantized"][name]
            exact, bound = exact_and_bound(w64, deltas.get(module, []), torch.bfloat16)
            err = (tensor.double() - exact).abs()
            assert (err <= bound).all(), f"{name}: {float((err / bound).max()):.3g} of the bound"
        else:  # never quantized (embeddings, norms, lm_head): byte for byte
            assert torch.equal(bits(tensor), bits(base[name])), name
    assert main(["verify", str(out)]) == 0


def test_plan_and_report_name_the_scheme(tmp_path: Path, fp8: dict, capsys) -> None:
    args = ["--base", str(fp8["base"]), "--adapter", str(fp8["peft"].adapter)]
    assert main(["plan", *args]) == 0
    shown = capsys.readouterr().out
    assert "quantized base (fp8): 14 weights dequantized to BF16" in shown
    assert "model.layers.{0-1}.self_attn.q_proj.weight  x2  [fp8 [128, 128]]" in shown  # per tensor family
    assert main([*args, "--output", str(tmp_path / "out"), "-q", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["outputs"][0]
    assert report["quantized"]["scheme"] == "fp8" and report["quantized"]["tensors"] == 14
    assert report["base_kind"] == "quantized (fp8)"
    assert report["quantized"]["bytes_out"] > report["quantized"]["bytes_in"]  # 16-bit out of 8-bit in


def test_the_output_loads_without_a_quantization_library(tmp_path: Path, fp8: dict) -> None:
    out = tmp_path / "out"
    assert main(["--base", str(fp8["base"]), "--adapter", str(fp8["peft"].adapter), "--output", str(out), "-q"]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    reference = transformers.LlamaForCausalLM(fp8["config"]).to(torch.bfloat16)
    exact = {name: (exact_and_bound(w, fp8["peft"].deltas.get(name.removesuffix(".weight"), []), torch.float32)[0]
                    if name in fp8["dequantized"] else w)
             for name, w in {**fp8["state"], **fp8["dequantized"]}.items()}
    reference.load_state_dict({k: v.to(torch.bfloat16) for k, v in exact.items()})
    assert torch.allclose(logits(loaded), logits(reference), atol=3e-2, rtol=3e-2)


def test_an_fp8_base_without_a_block_size_is_refused(tmp_path: Path, fp8: dict, capsys) -> None:
    import shutil

    base = Path(shutil.copytree(fp8["base"], tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (base / "config.json").write_text(json.dumps(config))
    assert main(["--base", str(base), "--adapter", str(fp8["peft"].adapter), "--output", str(tmp_path / "o"), "-q"]) == 4
    assert "without weight_block_size" in capsys.readouterr().err and not (tmp_path / "o").exists()


# compressed-tensors (llm-compressor's format): checkpoints written by the compressed-tensors
# library itself, held against its own dequantizer
def _minmax(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The observer's statistics for a weight: whole tensor, per output channel, or per block."""
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if strategy == "channel":
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    bn, bk = args.block_structure
    grid = (math.ceil(w.shape[0] / bn), math.ceil(w.shape[1] / bk))
    lo, hi = torch.empty(grid), torch.empty(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            lo[i, j], hi[i, j] = block.amin(), block.amax()
    return lo, hi


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory, fp8: dict) -> dict:
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is a test extra: pip install -e '.[test]'")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    root = tmp_path_factory.mktemp("compressed")
    made = {}
    for preset in ("FP8", "FP8_DYNAMIC", "FP8_BLOCK"):  # per tensor (+ input_scale), per channel, 128x128 blocks
        model = transformers.AutoModelForCausalLM.from_pretrained(fp8["base"].parent / "bf16", dtype=torch.bfloat16)
        config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                    ignore=["lm_head"])
        apply_quantization_config(model, config)
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                args = module.quantization_scheme.weights
                scale, zero = calculate_qparams(*_minmax(module.weight.detach().float(), args), args)
                module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
                module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape)
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.compress_model(model)
        model.save_pretrained(root / preset)
        compressor.update_config(root / preset)
        made[preset] = root / preset
    return made


@pytest.mark.parametrize("preset", ["FP8", "FP8_DYNAMIC", "FP8_BLOCK"])
def test_compressed_tensors_fp8_merges_into_bf16(tmp_path: Path, fp8: dict, compressed: dict, preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from streammerge.run import workingset

    monkeypatch.setattr(workingset, "MAX_CHUNK", 1000)  # chunks of a few rows: they start inside blocks
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    base, out = compressed[preset], tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(fp8["peft"].adapter), "--output", str(out), "-q",
                 "--max-mem", "40MB"]) == 0
    qconfig = json.loads((base / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**qconfig["config_groups"]["group_0"]["weights"])
    got, ref = read_checkpoint(out), read_checkpoint(base)
    assert set(got) == {n for n in ref if not n.endswith(("_scale", "input_scale"))}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = 0
    for name, tensor in got.items():
        if ref[name].dtype != torch.float8_e4m3fn:  # never quantized (lm_head, embeddings, norms)
            assert torch.equal(bits(tensor), bits(ref[name])), name
            continue
        q, scale = ref[name], ref[name + "_scale"]
        deltas = fp8["peft"].deltas.get(name.removesuffix(".weight"))
        if deltas is None:  # untouched: the library's own dequantization, bit for bit
            assert torch.equal(bits(tensor), bits(dequantize(q, scale, args=args).to(torch.bfloat16))), name
            continue
        n, k = q.shape
        block = (n, k) if scale.numel() == 1 else (1, k) if list(scale.shape) == [n, 1] else tuple(args.block_structure)
        w64 = q.double() * scale.double().reshape(math.ceil(n / block[0]), math.ceil(k / block[1])).repeat_interleave(
            block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
        exact, bound = exact_and_bound(w64, deltas, torch.bfloat16)
        assert ((tensor.double() - exact).abs() <= bound).all(), name
        merged += 1
    assert merged == 6  # q, v and down projections of both layers
    assert main(["verify", str(out)]) == 0


# --dtype fp8: the base's own scheme written back (names, grid, scale dtype, config as they are)
def e4m3_unambiguous(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3(v) (round to nearest even, after clamping to +-448), and where a relative nudge of 1e-5
    cannot change it (the merge's float32 x may differ from float64 by that much)."""
    lo, hi = ((v * f).clamp(-448, 448).to(torch.float8_e4m3fn).double() for f in (1 - 1e-5, 1 + 1e-5))
    return v.clamp(-448, 448).to(torch.float8_e4m3fn).double(), lo == hi


def requantized(x: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The pinned formula's scales, amax(|x|) / 448 per block rounded to the scale dtype (1 where amax
    is 0), and where a relative nudge of 1e-6 of amax cannot change them."""
    n, k = x.shape
    bn, bk = block
    grid = (math.ceil(n / bn), math.ceil(k / bk))
    s, sure = torch.ones(grid, dtype=torch.float64), torch.ones(grid, dtype=torch.bool)
    for i in range(grid[0]):
        for j in range(grid[1]):
            amax = x[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max()
            lo, mid, hi = ((amax * f / 448).to(scale_dtype).double() for f in (1 - 1e-6, 1, 1 + 1e-6))
            s[i, j], sure[i, j] = (mid, lo == hi) if amax > 0 else (1.0, True)
    return s, sure


def check_written_back(out: Path, base: Path, dequantized: dict, deltas: dict, block_of: callable,
                       report: dict) -> None:
    got, ref = read_checkpoint(out), read_checkpoint(base)
    assert set(got) == set(ref)  # same names: weights, scales, input scales
    cfg_out, cfg_in = (json.loads((d / "config.json").read_text()) for d in (out, base))
    assert cfg_out["quantization_config"] == cfg_in["quantization_config"]
    assert cfg_out.get("torch_dtype", cfg_out.get("dtype")) == cfg_in.get("torch_dtype", cfg_in.get("dtype"))
    touched, scales = {}, {}
    for name in dequantized:
        module = name.removesuffix(".weight")
        if module in deltas:
            touched[name] = exact_and_bound(dequantized[name], deltas[module], torch.float32)[0]
            scales[name] = next(n for n in ref if n.startswith(name + "_scale"))
    for name, tensor in got.items():  # everything else byte for byte, FP8 weights and their scales included
        if name not in touched and name not in scales.values():
            assert tensor.dtype == ref[name].dtype and torch.equal(bits(tensor), bits(ref[name])), name
    assert len(touched) == 6
    for name, x in touched.items():
        q, s = got[name], got[scales[name]]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == ref[scales[name]].dtype and s.shape == ref[scales[name]].shape
        block = block_of(q.shape, s)
        grid = s.double().reshape(math.ceil(q.shape[0] / block[0]), -1)
        want, sure = requantized(x, block, s.dtype)
        assert torch.equal(grid[sure], want[sure]) and torch.allclose(grid, want, rtol=2.0**-7, atol=0), name
        every = grid.repeat_interleave(block[0], 0)[: q.shape[0]].repeat_interleave(block[1], 1)[:, : q.shape[1]]
        expected, sure = e4m3_unambiguous(x / every)
        assert torch.equal(q.double()[sure], expected[sure]) and sure.float().mean() > 0.99, name
        w0, out64 = dequantized[name], q.double() * every
        survives = float(((out64 - w0) * (x - w0)).sum() / (x - w0).square().sum())
        assert report["requantized"][name] == pytest.approx(survives, rel=1e-3), name
    assert main(["verify", str(out)]) == 0


def test_block_fp8_written_back_as_fp8(tmp_path: Path, fp8: dict, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from oracle import report as read_report

    from streammerge.run import workingset

    monkeypatch.setattr(workingset, "MAX_CHUNK", 1000)  # chunks of one block row (128 rows) at a time
    out = tmp_path / "out"
    assert main(["--base", str(fp8["base"]), "--adapter", str(fp8["peft"].adapter), "--output", str(out), "-q",
                 "--dtype", "fp8", "--max-mem", "40MB", "--json"]) == 0
    report = read_report(capsys.readouterr().out)
    assert report["base_kind"] == "quantized (fp8)" and report["quantized"]["requantized"] == 6
    check_written_back(out, fp8["base"], fp8["dequantized"], fp8["peft"].deltas, lambda shape, s: (BLOCK, BLOCK),
                       report)
    assert main(["plan", "--base", str(fp8["base"]), "--adapter", str(fp8["peft"].adapter), "--dtype", "fp8"]) == 0
    assert ("quantized base (fp8): written back in its scheme: 6 merged weights re-quantized, 8 copied byte for byte"
            in capsys.readouterr().out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight = "model.layers.0.self_attn.q_proj.weight"  # its scale was in the other shard: now beside it
    assert index["weight_map"][weight + "_scale_inv"] == index["weight_map"][weight]


@pytest.mark.parametrize("preset", ["FP8", "FP8_DYNAMIC", "FP8_BLOCK"])
def test_compressed_tensors_fp8_written_back_as_fp8(tmp_path: Path, fp8: dict, compressed: dict, preset: str,
                                                    capsys) -> None:
    from oracle import report as read_report

    base, out = compressed[preset], tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(fp8["peft"].adapter), "--output", str(out), "-q",
                 "--dtype", "fp8", "--max-mem", "40MB", "--json"]) == 0
    report = read_report(capsys.readouterr().out)
    ref = read_checkpoint(base)

    def block_of(shape: tuple[int, int], s: torch.Tensor) -> tuple[int, int]:
        return tuple(shape) if s.numel() == 1 else (1, shape[1]) if list(s.shape) == [shape[0], 1] else (128, 128)

    dequantized = {n: ref[n].double() * ref[n + "_scale"].double().reshape(
        math.ceil(ref[n].shape[0] / block_of(ref[n].shape, ref[n + "_scale"])[0]), -1).repeat_interleave(
        block_of(ref[n].shape, ref[n + "_scale"])[0], 0)[: ref[n].shape[0]].repeat_interleave(
        block_of(ref[n].shape, ref[n + "_scale"])[1], 1)[:, : ref[n].shape[1]]
        for n in ref if ref[n].dtype == torch.float8_e4m3fn}
    check_written_back(out, base, dequantized, fp8["peft"].deltas, block_of, report)


def test_a_delta_lost_in_requantization_is_warned_about(tmp_path: Path, fp8: dict, capsys) -> None:
    """An adapter whose delta is ~1000x smaller than the FP8 step: most of it cannot survive
    re-quantization; the report says so and names the 16-bit output."""
    import shutil

    from safetensors.torch import load_file

    adapter = Path(shutil.copytree(fp8["peft"].adapter, tmp_path / "adapter"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v * (1e-3 if "lora_B" in k else 1) for k, v in tensors.items()}, adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert main(["--base", str(fp8["base"]), "--adapter", str(adapter), "--output", str(out), "--dtype", "fp8"]) == 0
    shown = capsys.readouterr().out
    assert "warning: re-quantized to FP8, 6 merged weight(s) kept under 50% of their delta" in shown
    assert "a 16-bit --dtype (bf16) keeps all of it" in shown


def test_fp8_out_needs_an_fp8_base(tmp_path: Path, fp8: dict, capsys) -> None:
    out = tmp_path / "out"
    assert main(["--base", str(fp8["base"].parent / "bf16"), "--adapter", str(fp8["peft"].adapter), "--output",
                 str(out), "--dtype", "fp8", "-q"]) == 4
    err = capsys.readouterr().err
    assert "--dtype fp8 writes an FP8 base back in its own scheme" in err and "is not quantized" in err
    assert not out.exists()


def test_e8m0_scales_are_refused_by_name(tmp_path: Path, fp8: dict, capsys) -> None:
    """MX-format power-of-two scales (F8_E8M0) are not block FP8's float scales: refused, not misread."""
    base = tmp_path / "base"
    base.mkdir()
    q = torch.zeros(256, 256).to(torch.float8_e4m3fn)
    save_file({"model.layers.0.self_attn.q_proj.weight": q,
               "model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(2, 2).to(torch.float8_e8m0fnu)},
              base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": QCONFIG}))
    assert main(["--base", str(base), "--adapter", str(fp8["peft"].adapter), "--output", str(tmp_path / "o"), "-q"]) == 4
    err = capsys.readouterr().err
    assert "E8M0" in err and "not read by this version" in err and not (tmp_path / "o").exists()
