"""Full tensors saved with an adapter: modules_to_save replacements, including a resized vocabulary
(new row count in the header and index, vocab_size in the config, the adapter's tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from oracle import report as oracle_report
from oracle import bits, build_base, read_checkpoint

from streammerge.cli import main


def peft_model(base: Path, *, resize: int | None = None, **lora):
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    if resize:
        torch.manual_seed(4)
        model.resize_token_embeddings(resize, mean_resizing=False)
    torch.manual_seed(5)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # "train" the saved modules so that the replacement is visible
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return pm


def logits_of(model, vocab: int) -> torch.Tensor:
    torch.manual_seed(6)
    with torch.no_grad():
        return model(input_ids=torch.randint(0, vocab, (2, 12))).logits.float()


def test_modules_to_save_replace_the_base(tmp_path: Path) -> None:
    base = build_base("llama", tmp_path / "base", dtype="fp32", sharded=True)
    pm = peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head", "norm"])
    pm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    saved = pm.base_model.model
    assert torch.equal(bits(got["lm_head.weight"]), bits(saved.lm_head.modules_to_save["default"].weight.detach()))
    assert torch.equal(bits(got["model.norm.weight"]), bits(saved.model.norm.modules_to_save["default"].weight.detach()))
    assert not torch.equal(got["lm_head.weight"], ref["lm_head.weight"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits_of(model, 160), logits_of(pm, 160), atol=1e-4, rtol=1e-4)
    assert main(["verify", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) == 0


def test_resized_vocabulary(tmp_path: Path, capsys) -> None:
    base = build_base("llama", tmp_path / "base", dtype="bf16", sharded=True)
    (base / "tokenizer.json").write_text('{"vocab": 160}')
    pm = peft_model(base, resize=200, r=4, lora_alpha=8, target_modules=["q_proj"],
                    modules_to_save=["embed_tokens", "lm_head"])
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    (adapter / "tokenizer.json").write_text('{"vocab": 200}')
    out = tmp_path / "out"
    assert main(["plan", "--base", str(base), "--adapter", str(adapter), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["config_changes"] == {"vocab_size": 200} and plan["tokenizer_from"] == str(adapter)
    assert set(plan["replaced"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q", "--json"]) == 0
    report = oracle_report(capsys.readouterr().out)
    assert any("vocabulary resized to 200" in n for n in report["notes"])
    got = read_checkpoint(out)
    assert got["model.embed_tokens.weight"].shape == got["lm_head.weight"].shape == (200, 64)
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16  # the base's dtype is kept
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 200
    assert (out / "tokenizer.json").read_text() == '{"vocab": 200}'
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.allclose(logits_of(model, 200), logits_of(pm, 200), atol=3e-2, rtol=3e-2)
    assert main(["verify", "--base", str(base), "--adapter", str(adapter), "--output", str(out)]) == 0


def test_resizing_only_the_embedding_is_refused(tmp_path: Path, capsys) -> None:
    """PEFT saves the resized head too; an adapter without it would leave the model inconsistent."""
    from safetensors.torch import load_file, save_file

    base = build_base("llama", tmp_path / "base", dtype="fp32", sharded=False)
    pm = peft_model(base, resize=200, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    pm.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    assert tensors.pop("base_model.model.lm_head.weight").shape == (200, 64)
    save_file(tensors, path)
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out"), "-q"]) != 0
    assert "lm_head.weight keeps 160" in capsys.readouterr().err


def test_trainable_tokens_replace_rows(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    base = build_base("llama", tmp_path / "base", dtype="bf16", sharded=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(7)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False,
                                          trainable_token_indices={"embed_tokens": [3, 7, 150]}))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))  # "trained" rows
                values = p.detach().clone()
    pm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q",
                 "--max-mem", "34MiB"]) == 0
    got, ref = read_checkpoint(out)["model.embed_tokens.weight"], read_checkpoint(base)["model.embed_tokens.weight"]
    ids = [3, 7, 150]
    assert torch.equal(bits(got[ids]), bits(values.to(torch.bfloat16)))
    keep = [i for i in range(ref.shape[0]) if i not in ids]
    assert torch.equal(bits(got[keep]), bits(ref[keep]))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits_of(merged, 160), logits_of(pm, 160), atol=3e-2, rtol=3e-2)
    assert main(["verify", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) == 0
