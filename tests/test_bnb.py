"""bitsandbytes 4-bit bases (QLoRA): checkpoints saved by transformers from ``load_in_4bit`` models
on the CPU (nf4 with double quantization, fp4 without), merged into 16-bit outputs and held against
bitsandbytes' own ``dequantize_4bit`` and a float64 recomputation.

The dimensions (hidden 200, intermediate 328, k/v 100) are not multiples of the 64-element block,
so blocks straddle rows and a row chunk must find its absmax by flat index.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from oracle import bits, exact_and_bound, logits, odd_llama, read_checkpoint

from streammerge.cli import main

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test extra: pip install -e '.[test]'")
STATE = ".quant_state.bitsandbytes__"


def make_qlora(root: Path) -> dict:
    """Three 4-bit bases of one tiny Llama and its adapter (conftest's session fixture ``qlora``)."""
    config, peft = odd_llama(root, hidden=200, intermediate=328, dtype="bf16", targets=["q_proj", "down_proj"])
    bases = {}
    for kind, double, storage in (("nf4", True, torch.uint8), ("fp4", False, torch.uint8),
                                  ("nf4-bf16-storage", True, torch.bfloat16)):
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind[:3], bnb_4bit_use_double_quant=double,
                                            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=storage)
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "bf16", quantization_config=q,
                                                                  device_map="cpu", dtype=torch.bfloat16)
        model.save_pretrained(root / kind)
        bases[kind] = root / kind
    return {"bases": bases, "peft": peft, "config": config}


def bnb_dequantized(saved: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of one saved 4-bit weight (its QuantState from the saved tensors)."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    prefix = name + "."
    state = QuantState.from_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}, device="cpu")
    return dequantize_4bit(saved[name], state)


def dequantized64(saved: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The same weight in float64, from the saved tensors: codes high nibble first over the flattened
    tensor, through quant_map, times the absmax of their 64-element flat block (undone from its
    double quantization when nested)."""
    state = next(k for k in saved if k.startswith(name + STATE))
    meta = json.loads(bytes(saved[state].tolist()))
    packed = saved[name].view(-1).view(torch.uint8)  # (codes stored as bf16 are the same bytes)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()
    absmax = saved[name + ".absmax"].double()
    if name + ".nested_absmax" in saved:
        blocks = torch.arange(absmax.numel()) // meta["nested_blocksize"]
        absmax = (saved[name + ".nested_quant_map"].double()[absmax.long()]
                  * saved[name + ".nested_absmax"].double()[blocks] + meta["nested_offset"])
    flat = saved[name + ".quant_map"].double()[codes] * absmax[torch.arange(codes.numel()) // meta["blocksize"]]
    return flat.view(*meta["shape"])


@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf4-bf16-storage"])
def test_a_4bit_base_merges_into_bf16(tmp_path: Path, qlora: dict, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from streammerge.run import workingset

    monkeypatch.setattr(workingset, "MAX_CHUNK", 1000)  # chunks of a few rows: they start inside blocks
    base, out = qlora["bases"][kind], tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(qlora["peft"].adapter), "--output", str(out), "-q",
                 "--max-mem", "40MB"]) == 0
    saved, got = read_checkpoint(base), read_checkpoint(out)
    quantized = {k.split(STATE)[0] for k in saved if STATE in k}
    assert len(quantized) == 14
    assert set(got) == {k for k in saved if k in quantized or not any(k.startswith(q + ".") for q in quantized)}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    merged = 0
    for name, tensor in got.items():
        if name not in quantized:
            assert torch.equal(bits(tensor), bits(saved[name])), name  # embeddings, norms, lm_head: as stored
            continue
        reference = bnb_dequantized(saved, name)  # bf16, (out, in)
        assert tensor.shape == reference.shape and tensor.dtype == torch.bfloat16
        deltas = qlora["peft"].deltas.get(name.removesuffix(".weight"))
        if deltas is None:  # untouched: bitsandbytes' dequantization, value for value (fp4's code for -0.0
            assert torch.equal(tensor, reference), name  # is -0.0 in the saved quant_map, +0.0 in bnb's CPU kernel)
            continue
        w = dequantized64(saved, name)
        assert torch.equal(w.to(torch.bfloat16), reference)  # the float64 formula is bitsandbytes' (rounded once)
        exact, bound = exact_and_bound(w, deltas, torch.bfloat16)
        assert ((tensor.double() - exact).abs() <= bound).all(), name
        merged += 1
    assert merged == 4
    assert main(["verify", str(out)]) == 0


def test_the_merged_4bit_base_loads_and_runs(tmp_path: Path, qlora: dict) -> None:
    """The output loads in transformers with no quantization config; its logits are the float64
    merged model's (the 4-bit weights dequantized here in float64, plus the deltas)."""
    base, out = qlora["bases"]["nf4"], tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(qlora["peft"].adapter), "--output", str(out), "-q"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    saved = read_checkpoint(base)
    exact = {}
    for name in [k for k in saved if k.endswith(".weight")]:  # (not absmax, quant_map, quant_state ...)
        if any(k.startswith(name + STATE) for k in saved):
            w = dequantized64(saved, name)
            exact[name] = exact_and_bound(w, qlora["peft"].deltas.get(name.removesuffix(".weight"), []), torch.float32)[0]
        else:
            exact[name] = saved[name].double()
    reference = transformers.LlamaForCausalLM(qlora["config"])
    reference.load_state_dict({k: v.float() for k, v in exact.items()})
    assert torch.allclose(logits(model), logits(reference), atol=2e-2, rtol=2e-2)
