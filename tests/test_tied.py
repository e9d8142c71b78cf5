"""Tied embeddings: when the merge makes the output head and the input embedding differ, both
are written and tie_word_embeddings is switched off (also inside text_config). The reference is
the PEFT model's own forward, which uses the embedding + its LoRA for input and the tied weight +
the head's LoRA for output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from oracle import bits, build_adapter, build_base, exact_and_bound, logits, read_checkpoint

from streammerge.cli import main


def peft_logits(base: Path, adapter: Path, cls=transformers.AutoModelForCausalLM) -> torch.Tensor:
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(cls.from_pretrained(base), adapter))


@pytest.mark.parametrize("targets", [["lm_head", "q_proj"], ["embed_tokens"], ["embed_tokens", "lm_head"]],
                         ids=["head", "embedding", "both"])
def test_tied_llama(tmp_path: Path, targets: list[str], capsys) -> None:
    base = build_base("llama", tmp_path / "base", dtype="fp32", sharded=True, tie=True)
    assert "lm_head.weight" not in read_checkpoint(base)
    peft = build_adapter(base, tmp_path / "adapter", dtype="fp32", r=4, lora_alpha=8, target_modules=targets)
    out = tmp_path / "out"
    assert main(["plan", "--base", str(base), "--adapter", str(peft.adapter), "--json", "--max-mem", "64MB"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["added"] == ["lm_head.weight"] and plan["config_changes"] == {"tie_word_embeddings": False}
    assert plan["memory"]["working_set_bytes"] <= 64 * 10**6
    assert main(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "-q"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    embedding = ref["model.embed_tokens.weight"]
    for name, module in (("lm_head.weight", "lm_head"), ("model.embed_tokens.weight", "model.embed_tokens")):
        if module in peft.deltas:
            exact, bound = exact_and_bound(embedding, peft.deltas[module], torch.float32)
            assert ((got[name].double() - exact).abs() <= bound).all(), name
        else:
            assert torch.equal(bits(got[name]), bits(embedding)), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(model), peft_logits(base, peft.adapter), atol=1e-4, rtol=1e-4)
    assert main(["verify", "--base", str(base), "--adapter", str(peft.adapter), "--output", str(out)]) == 0


def test_tied_vlm_unties_inside_text_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, in_chans=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2), tie_word_embeddings=True)
    cls = transformers.Qwen2VLForConditionalGeneration
    base = tmp_path / "base"
    cls(cfg).save_pretrained(base)
    assert "lm_head.weight" not in read_checkpoint(base)
    peft = build_adapter(base, tmp_path / "adapter", dtype="fp32", r=4, lora_alpha=8,
                         target_modules=["lm_head", "q_proj"], auto_class=cls)
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    assert "lm_head.weight" in read_checkpoint(out)
    assert torch.allclose(logits(cls.from_pretrained(out)), peft_logits(base, peft.adapter, cls), atol=1e-4, rtol=1e-4)
