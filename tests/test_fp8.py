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
from oracle import bits, build_adapter, exact_and_bound, logits, read_checkpoint
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


@pytest.fixture(scope="module")
def fp8(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fp8")
    config = transformers.LlamaConfig(vocab_size=160, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "bf16")
    peft = build_adapter(root / "bf16", root / "adapter", dtype="bf16", r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj", "down_proj"])
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
