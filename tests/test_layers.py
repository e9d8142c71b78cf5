"""Layer kinds other than Linear: GPT-2 Conv1D (weights stored in x out) and Embedding LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from oracle import assert_merged, build_adapter, build_base, logits, read_checkpoint
from safetensors.torch import save_file

from streammerge.cli import main


@pytest.mark.parametrize("strip_prefix", [False, True], ids=["saved-by-transformers", "hub-layout-no-prefix"])
def test_gpt2_conv1d(tmp_path: Path, strip_prefix: bool) -> None:
    """Conv1D is decided by the layer kind: c_attn (64 -> 192) and the square c_proj (64 x 64) alike."""
    base = build_base("gpt2", tmp_path / "base", dtype="fp32", sharded=False)
    if strip_prefix:  # the original gpt2 repo stores 'h.0...' without 'transformer.'
        tensors = read_checkpoint(base)
        save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, base / "model.safetensors",
                  metadata={"format": "pt"})
    peft = build_adapter(base, tmp_path / "adapter", dtype="fp32", r=4, lora_alpha=8, fan_in_fan_out=True,
                         target_modules=["c_attn", "c_proj", "c_fc"])
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "-q"]) == 0
    prefix = "" if strip_prefix else "transformer."
    deltas = {prefix + m.removeprefix("transformer."): d for m, d in peft.deltas.items()}
    assert assert_merged(out, base, deltas) == len(peft.deltas) == 8
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(model), logits(peft.merged), atol=1e-4, rtol=1e-4)


def test_saved_fan_in_fan_out_flag_is_not_trusted(tmp_path: Path) -> None:
    """An adapter config that says fan_in_fan_out=false on GPT-2 still merges Conv1D transposed."""
    base = build_base("gpt2", tmp_path / "base", dtype="fp32", sharded=False)
    peft = build_adapter(base, tmp_path / "adapter", dtype="fp32", r=4, lora_alpha=8, fan_in_fan_out=True,
                         target_modules=["c_proj"])
    config = json.loads((peft.adapter / "adapter_config.json").read_text())
    (peft.adapter / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "-q"]) == 0
    assert_merged(out, base, peft.deltas)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_embedding_lora(tmp_path: Path, dtype: str) -> None:
    """lora_embedding_A (r, vocab) / lora_embedding_B (dim, r): W += s * (B A).T, row-chunked over the vocab."""
    base = build_base("llama", tmp_path / "base", dtype=dtype, sharded=True)
    peft = build_adapter(base, tmp_path / "adapter", dtype=dtype, r=4, lora_alpha=8,
                         target_modules=["embed_tokens", "q_proj", "lm_head"])
    assert "model.embed_tokens" in peft.deltas
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "-q",
                 "--max-mem", "34MiB"]) == 0  # small chunks: the embedding is merged in several pieces
    assert assert_merged(out, base, peft.deltas) == 4
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    tol = 1e-4 if dtype == "fp32" else 3e-2
    assert torch.allclose(logits(model), logits(peft.merged), atol=tol, rtol=tol)


def test_embedding_saved_with_the_adapter_is_the_base(tmp_path: Path) -> None:
    """PEFT saves '<embedding>.base_layer.weight' with the adapter and loads it over the base's:
    the merge must start from that copy (here made to differ), as PEFT's merged model does."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from streammerge.cli import main as cli

    base = build_base("llama", tmp_path / "base", dtype="fp32", sharded=False)
    peft = build_adapter(base, tmp_path / "adapter", dtype="fp32", r=4, lora_alpha=8, target_modules=["embed_tokens"])
    path = peft.adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 0.5  # a "trained" base layer
    save_file(tensors, path, metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    expected = PeftModel.from_pretrained(model, peft.adapter).merge_and_unload().state_dict()["model.embed_tokens.weight"]
    out = tmp_path / "out"
    assert cli(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "-q"]) == 0
    got = read_checkpoint(out)["model.embed_tokens.weight"]
    (a, b, s), = peft.deltas["model.embed_tokens"]
    exact = tensors[key].double() + s * (b @ a)
    assert (got.double() - exact).abs().max() < 1e-5 and (got - expected).abs().max() < 1e-5
    assert cli(["verify", "--base", str(base), "--adapter", str(peft.adapter), "--output", str(out)]) == 0


@pytest.mark.parametrize("bias", ["lora_bias", "all", "lora_only"])
def test_biases(tmp_path: Path, bias: str) -> None:
    """lora_bias (bias += s * lora_B.bias) and bias="all"/"lora_only" (trained biases saved, replacing the base's)."""
    from peft import LoraConfig, get_peft_model

    base = build_base("qwen2", tmp_path / "base", dtype="fp32", sharded=True)  # Qwen2 has q/k/v biases
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(8)
    options = {"lora_bias": True} if bias == "lora_bias" else {"bias": bias}
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False, **options))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(torch.randn_like(p))  # a trained bias, or a non-zero lora_B.bias
    pm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    changed = {n for n in ref if n.endswith(".bias") and not torch.equal(got[n], ref[n])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2)
                       for p in (("q", "k", "v") if bias == "all" else ("q", "v"))}
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(merged), logits(pm), atol=1e-4, rtol=1e-4)
    assert main(["verify", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) == 0


def test_lora_bias_without_a_base_bias_is_refused(tmp_path: Path, capsys) -> None:
    from peft import LoraConfig, get_peft_model

    base = build_base("llama", tmp_path / "base", dtype="fp32", sharded=False)  # Llama: no biases
    pm = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                        LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out"), "-q"]) != 0
    assert "has lora_bias but the base layer has no bias" in capsys.readouterr().err


def test_phi3_fused_projections(tmp_path: Path) -> None:
    """Phi-3 keeps q/k/v and gate/up fused in single Linear layers (qkv_proj, gate_up_proj)."""
    base = build_base("phi3", tmp_path / "base", dtype="bf16", sharded=True)
    peft = build_adapter(base, tmp_path / "adapter", dtype="bf16", r=4, lora_alpha=8)
    assert {m.rsplit(".", 1)[-1] for m in peft.deltas} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "-q"]) == 0
    assert assert_merged(out, base, peft.deltas) == 8
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.allclose(logits(model), logits(peft.merged), atol=3e-2, rtol=3e-2)
