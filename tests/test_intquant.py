"""Integer-quantized bases (GPTQ, AWQ, compressed-tensors pack-quantized W4A16/W8A16) merged into
16-bit outputs.

One tiny real Llama (hidden 192, intermediate 320, k/v 96) is quantized per (row, group of
columns) with min/max scales and zero points (GPTQ: groups of 128, partial last groups; AWQ and
compressed-tensors: 64, as their libraries need whole groups). Oracles:
- compressed-tensors: checkpoints written by the compressed-tensors library (its compressor packs
  the codes), dequantized by its own decompressor;
- AWQ: the fixture's packing is converted by compressed-tensors' own AutoAWQ converter and
  dequantized by its decompressor, which must give the weights the fixture quantized (so the
  fixture's packing is the library's reading of AWQ, not ours);
- GPTQ: a float64 recomputation from the integers drawn before packing (codes, zero points,
  scales, act-order groups), packed here as AutoGPTQ's format defines it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from oracle import bits, exact_and_bound, logits, odd_llama, read_checkpoint
from safetensors.torch import save_file

from streammerge.cli import main

GROUP = 128  # GPTQ: partial last groups (192 = 128 + 64, 320 = 2 * 128 + 64)
WHOLE = 64  # AWQ and compressed-tensors need whole groups (their libraries refuse partial ones)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("int4")
    config, peft = odd_llama(root, hidden=192, intermediate=320, dtype="fp16", targets=["q_proj", "v_proj", "down_proj"])
    return {"root": root, "config": config, "peft": peft, "state": read_checkpoint(root / "fp16")}


def quantize(w: torch.Tensor, g_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per (row, group): codes q (N, K), zero points z (N, G), float16 scales s (N, G)."""
    n, groups = w.shape[0], int(g_idx.max()) + 1
    s, z = torch.ones(n, groups, dtype=torch.float64), torch.zeros(n, groups, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g].double()
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        s[:, g] = ((hi - lo) / 15).clamp(min=1e-8).half().double()
        z[:, g] = (-lo / s[:, g]).round().clamp(0, 15).long()
    q = (w.double() / s[:, g_idx]).round().long() + z[:, g_idx]
    return q.clamp(0, 15), z, s.half()


def dequant64(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    return (q - z[:, g_idx]).double() * s.double()[:, g_idx]


def pack(codes: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """int32 words along the last dimension: element order[j] of each 8 in bits 4j."""
    words = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for j in range(8):
        words |= codes[:, order[j]::8].long() << (4 * j)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def save_quantized(llama: dict, name: str, qconfig: dict, layer: callable) -> tuple[Path, dict[str, torch.Tensor]]:
    """The f16 checkpoint with every projection replaced by ``layer(module, weight)``'s tensors."""
    tensors, dequantized = {}, {}
    for key, w in llama["state"].items():
        if key.endswith("proj.weight"):
            saved, dequantized[key] = layer(key.removesuffix(".weight"), w)
            tensors.update(saved)
        else:
            tensors[key] = w
    base = llama["root"] / name
    base.mkdir()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((llama["root"] / "fp16" / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))
    return base, dequantized


def gptq_layer(version: str, act_order: bool) -> callable:
    """GPTQ tensors: qweight (K/8, N) packed down the input dimension, qzeros (G, N/8) (v1: z - 1),
    scales (G, N), and with act-order a permuted g_idx."""
    def layer(module: str, w: torch.Tensor) -> tuple[dict, torch.Tensor]:
        k = w.shape[1]
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)) if act_order else torch.arange(k)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[perm] = torch.arange(k) // GROUP  # act-order: groups over the columns in permuted order
        q, z, s = quantize(w, g_idx)
        assert version == "gptq_v2" or z.min() >= 1  # (v1 cannot store a zero point of 0)
        saved = {f"{module}.qweight": pack(q).T.contiguous(),
                 f"{module}.qzeros": pack(z.T - (1 if version == "gptq" else 0)),
                 f"{module}.scales": s.T.contiguous()}
        if act_order:
            saved[f"{module}.g_idx"] = g_idx.to(torch.int32)
        return saved, dequant64(q, z, s, g_idx)
    return layer


def awq_layer(zero_point: bool) -> callable:
    """AWQ gemm tensors: qweight (K, N/8) and qzeros (G, N/8) in AWQ's interleaved order, scales (G, N);
    without zero points the codes are centred on 8 and qzeros (saved as zeros) are not read."""
    def layer(module: str, w: torch.Tensor) -> tuple[dict, torch.Tensor]:
        g_idx = torch.arange(w.shape[1]) // WHOLE
        q, z, s = quantize(w, g_idx)
        if not zero_point:
            z = torch.full_like(z, 8)
            q = ((w.double() / s.double()[:, g_idx]).round() + 8).clamp(0, 15).long()
        saved = {f"{module}.qweight": pack(q.T, AWQ_ORDER),
                 f"{module}.qzeros": pack(z.T if zero_point else torch.zeros_like(z.T), AWQ_ORDER),
                 f"{module}.scales": s.T.contiguous()}
        return saved, dequant64(q, z, s, g_idx)
    return layer


GPTQ_CASES = {"v1-act-order": ("gptq", True), "v2-in-order": ("gptq_v2", False)}


@pytest.fixture(scope="module")
def gptq(llama: dict) -> dict:
    made = {}
    for case, (version, act_order) in GPTQ_CASES.items():
        qconfig = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order, "sym": False,
                   "checkpoint_format": version}
        made[case] = save_quantized(llama, f"gptq-{case}", qconfig, gptq_layer(version, act_order))
    return made


@pytest.fixture(scope="module")
def awq(llama: dict) -> dict:
    return {zp: save_quantized(llama, f"awq-{zp}", {"quant_method": "awq", "bits": 4, "group_size": WHOLE,
                                                    "zero_point": zp, "version": "gemm"}, awq_layer(zp))
            for zp in (True, False)}


def check_merged(out: Path, base: Path, dequantized: dict[str, torch.Tensor], llama: dict) -> int:
    """Every dequantized weight within one rounding of float64 (W + deltas), the rest bit for bit; the
    output loads in transformers without a quantization library, with the float64 merged model's logits."""
    got, ref = read_checkpoint(out), read_checkpoint(base)
    assert set(got) == set(llama["state"])  # qweight/qzeros/scales/g_idx gone, names back to X.weight
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config.get("torch_dtype", config.get("dtype")) == "float16"
    merged = 0
    for name, tensor in got.items():
        if name not in dequantized:
            assert torch.equal(bits(tensor), bits(ref[name])), name
            continue
        deltas = llama["peft"].deltas.get(name.removesuffix(".weight"), [])
        exact, bound = exact_and_bound(dequantized[name], deltas, torch.float16)
        assert tensor.dtype == torch.float16 and ((tensor.double() - exact).abs() <= bound).all(), name
        merged += bool(deltas)
    assert merged == 6  # q, v and down projections of both layers
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # no quantization library
    reference = transformers.LlamaForCausalLM(llama["config"])
    exact = {n: exact_and_bound(w, llama["peft"].deltas.get(n.removesuffix(".weight"), []), torch.float16)[0]
             for n, w in dequantized.items()}
    reference.load_state_dict({k: v.float() for k, v in {**llama["state"], **exact}.items()})
    assert torch.allclose(logits(loaded), logits(reference), atol=2e-2, rtol=2e-2)  # the float64 merged model's
    return merged


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_merges_into_f16(tmp_path: Path, llama: dict, gptq: dict, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from streammerge.run import workingset

    monkeypatch.setattr(workingset, "MAX_CHUNK", 1000)  # chunks of a few rows: column ranges of qweight
    base, dequantized = gptq[case]
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(llama["peft"].adapter), "--output", str(out), "-q",
                 "--max-mem", "40MB"]) == 0
    check_merged(out, base, dequantized, llama)
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("zero_point", [True, False])
def test_awq_merges_into_f16_against_the_converters_reading(tmp_path: Path, llama: dict, awq: dict, zero_point: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is a test extra: pip install -e '.[test]'")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    from streammerge.run import workingset

    base, dequantized = awq[zero_point]
    converter = AutoAWQConverter(group_size=WHOLE, zero_point=zero_point)
    scheme = converter._build_quant_config().config_groups["config_group_0"]
    converted = converter.process(dict(read_checkpoint(base)))
    for name, mine in dequantized.items():  # the library's reading of the fixture is what was quantized
        module = name.removesuffix(".weight")
        state = {k.removeprefix(module + "."): v for k, v in converted.items() if k.startswith(module + ".weight_")}
        state["weight_scale"] = state["weight_scale"].double()
        assert torch.equal(PackedQuantizationCompressor.decompress(state, scheme)["weight"].double(), mine), name
    assert ct is not None
    monkeypatch.setattr(workingset, "MAX_CHUNK", 1000)  # chunks of 8 rows at a time: whole words
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(llama["peft"].adapter), "--output", str(out), "-q",
                 "--max-mem", "40MB"]) == 0
    check_merged(out, base, dequantized, llama)
    assert main(["verify", str(out)]) == 0


PRESETS = ("W4A16", "W4A16_ASYM", "W8A16")  # 4-bit groups symmetric / with zero points; 8-bit per channel


@pytest.fixture(scope="module")
def packed(llama: dict) -> dict:
    """compressed-tensors ``pack-quantized`` checkpoints written by the compressed-tensors library."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is a test extra: pip install -e '.[test]'")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    made = {}
    for preset in PRESETS:
        model = transformers.AutoModelForCausalLM.from_pretrained(llama["root"] / "fp16", dtype=torch.float16)
        scheme = preset_name_to_scheme(preset, ["Linear"])
        weights = scheme.weights.model_dump()
        weights.update({"strategy": "channel", "group_size": None} if preset == "W8A16" else {"group_size": WHOLE})
        scheme.weights = type(scheme.weights)(**weights)
        apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                args, w = module.quantization_scheme.weights, module.weight.detach().float()
                view = w.view(w.shape[0], -1, args.group_size) if args.group_size else w[:, None, :]
                scale, zero = calculate_qparams(view.amin(-1), view.amax(-1), args)
                module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
                module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape)
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.compress_model(model)
        model.save_pretrained(llama["root"] / preset)
        compressor.update_config(llama["root"] / preset)
        made[preset] = llama["root"] / preset
    return made


@pytest.mark.parametrize("preset", PRESETS)
def test_pack_quantized_merges_into_f16(tmp_path: Path, llama: dict, packed: dict, preset: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from streammerge.run import workingset

    base = packed[preset]
    group = json.loads((base / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(**group)
    stored = read_checkpoint(base)
    dequantized = {}  # the library's own decompression, in float64
    for name in [n for n in stored if n.endswith(".weight_packed")]:
        module = name.removesuffix(".weight_packed")
        state = {k.removeprefix(module + "."): v for k, v in stored.items() if k.startswith(module + ".weight_")}
        state["weight_scale"] = state["weight_scale"].double()
        dequantized[module + ".weight"] = PackedQuantizationCompressor.decompress(state, scheme)["weight"].double()
    assert len(dequantized) == 14
    monkeypatch.setattr(workingset, "MAX_CHUNK", 1000)
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(llama["peft"].adapter), "--output", str(out), "-q",
                 "--max-mem", "40MB"]) == 0
    check_merged(out, base, dequantized, llama)
    assert main(["verify", str(out)]) == 0


def test_plan_names_the_scheme_per_family(llama: dict, gptq: dict, capsys) -> None:
    base, _ = gptq["v1-act-order"]
    assert main(["plan", "--base", str(base), "--adapter", str(llama["peft"].adapter)]) == 0
    shown = capsys.readouterr().out
    assert "quantized base (gptq): 14 weights dequantized to F16" in shown
    assert "model.layers.{0-1}.self_attn.q_proj.weight  x2  [gptq [4, 128, 1]]" in shown


@pytest.mark.parametrize("change, said", [
    ({"bits": 8}, "GPTQ 8-bit, checkpoint format 'gptq_v2', is not read"),
    ({"checkpoint_format": "marlin"}, "checkpoint format 'marlin', is not read"),
    ({"quant_method": "awq", "version": "gemv"}, "AWQ 4-bit version 'gemv' is not read"),
    ({"quant_method": "hqq"}, "quant_method 'hqq'"),
])
def test_other_integer_formats_are_refused_by_name(tmp_path: Path, llama: dict, gptq: dict, change: dict, said: str,
                                                   capsys) -> None:
    import shutil

    base = Path(shutil.copytree(gptq["v2-in-order"][0], tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"].update(change)
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(llama["peft"].adapter), "--output", str(out), "-q"]) == 4
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_other_compressed_tensors_formats_are_refused_by_name(tmp_path: Path, llama: dict, packed: dict,
                                                              capsys) -> None:
    import shutil

    base = Path(shutil.copytree(packed["W4A16"], tmp_path / "base"))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"]["format"] = "nvfp4-pack-quantized"
    for group in config["quantization_config"]["config_groups"].values():
        group["format"] = "nvfp4-pack-quantized"
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(llama["peft"].adapter), "--output", str(out), "-q"]) == 4
    err = capsys.readouterr().err
    assert "compressed-tensors format nvfp4-pack-quantized is not read by this version" in err and not out.exists()
