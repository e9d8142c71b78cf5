"""Multimodal checkpoints whose on-disk names differ from the adapter's in-memory names
(transformers >= 4.52 renames): every adapted module, language tower included, must merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from oracle import assert_merged, bits, build_adapter, disk_names, logits, read_checkpoint

from streammerge.cli import main

TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def qwen2_vl() -> transformers.PreTrainedModel:
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, in_chans=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2))
    return transformers.Qwen2VLForConditionalGeneration(cfg)


def llava() -> transformers.PreTrainedModel:
    cfg = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**TEXT),
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=28, patch_size=14))
    return transformers.LlavaForConditionalGeneration(cfg)


SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)


def gemma3() -> transformers.PreTrainedModel:
    cfg = transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**TEXT, head_dim=16),
                                    vision_config=transformers.SiglipVisionConfig(**SIGLIP), mm_tokens_per_image=4)
    return transformers.Gemma3ForConditionalGeneration(cfg)


def paligemma() -> transformers.PreTrainedModel:
    cfg = transformers.PaliGemmaConfig(text_config=transformers.GemmaConfig(**TEXT, head_dim=16),
                                       vision_config=transformers.SiglipVisionConfig(**SIGLIP))
    return transformers.PaliGemmaForConditionalGeneration(cfg)


def mistral3() -> transformers.PreTrainedModel:
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14, head_dim=16)
    cfg = transformers.Mistral3Config(text_config=transformers.MistralConfig(**TEXT, head_dim=16), vision_config=vision)
    return transformers.Mistral3ForConditionalGeneration(cfg)


def internvl() -> transformers.PreTrainedModel:
    vision = transformers.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=[28, 28], patch_size=[14, 14])
    cfg = transformers.InternVLConfig(text_config=transformers.Qwen2Config(**TEXT), vision_config=vision)
    return transformers.InternVLForConditionalGeneration(cfg)


def qwen2_5_vl() -> transformers.PreTrainedModel:
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, fullatt_block_indexes=[0]))
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg)


FAMILIES = [qwen2_vl, qwen2_5_vl, llava, gemma3, paligemma, mistral3, internvl]


@pytest.mark.parametrize("build", FAMILIES, ids=[f.__name__.replace("_", "-") for f in FAMILIES])
def test_vlm_language_and_vision_towers_merge(tmp_path: Path, build) -> None:
    torch.manual_seed(0)
    model = build().to(torch.bfloat16)
    cls = type(model)
    base = tmp_path / "base"
    model.save_pretrained(base)
    peft = build_adapter(base, tmp_path / "adapter", dtype="bf16", r=4, lora_alpha=8, auto_class=cls)
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "-q"]) == 0

    # Map PEFT's in-memory module names to disk names by value, through transformers' own save.
    peft.merged.save_pretrained(tmp_path / "peft-merged")
    names = disk_names(peft.merged, tmp_path / "peft-merged")
    deltas = {names[f"{m}.weight"].removesuffix(".weight"): d for m, d in peft.deltas.items()}
    assert any("language_model" in m or m.startswith("model.layers") for m in deltas)  # the text tower is adapted
    assert assert_merged(out, base, deltas) == len(peft.deltas)
    ours, theirs = read_checkpoint(out), read_checkpoint(tmp_path / "peft-merged")
    for name, t in theirs.items():
        diff = (ours[name].double() - t.double()).abs()
        assert (diff <= t.double().abs() * torch.finfo(torch.bfloat16).eps + 1e-30).all(), name
    reloaded = cls.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.allclose(logits(reloaded), logits(peft.merged), atol=2e-2, rtol=2e-2)
    unchanged = [n for n in ours if n.removesuffix(".weight") not in deltas]
    assert all(torch.equal(bits(ours[n]), bits(read_checkpoint(base)[n])) for n in unchanged)


OLD_MEMORY_NAMES = {  # in-memory names before transformers 4.52, as older PEFT adapters carry them
    "llava": [("base_model.model.model.language_model.", "base_model.model.language_model.model."),
              ("base_model.model.model.vision_tower.", "base_model.model.vision_tower."),
              ("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector."),
              ("base_model.model.lm_head.", "base_model.model.language_model.lm_head.")],
    "qwen2-vl": [("base_model.model.model.language_model.", "base_model.model.model."),
                 ("base_model.model.model.visual.", "base_model.model.visual.")],
}


@pytest.mark.parametrize("build", [qwen2_vl, llava], ids=["qwen2-vl", "llava"])
def test_old_adapter_names_on_a_checkpoint_with_new_names(tmp_path: Path, build) -> None:
    """A checkpoint written with the new (in-memory) names and an adapter from before the rename."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = build().to(torch.bfloat16)
    cls, family = type(model), build.__name__.replace("_", "-")
    model.save_pretrained(tmp_path / "saved")
    base = tmp_path / "base"
    base.mkdir()
    save_file({n: p.detach().contiguous() for n, p in model.state_dict().items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    (base / "config.json").write_bytes((tmp_path / "saved" / "config.json").read_bytes())
    peft = build_adapter(base, tmp_path / "adapter", dtype="bf16", r=4, lora_alpha=8, auto_class=cls,
                         target_modules="all-linear")
    path = peft.adapter / "adapter_model.safetensors"
    renamed = {}
    for key, value in load_file(path).items():
        for new, old in OLD_MEMORY_NAMES[family]:
            key = key.replace(new, old) if key.startswith(new) else key
        renamed[key] = value
    assert set(renamed) != set(load_file(path))
    save_file(renamed, path)
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(peft.adapter), "--output", str(out), "-q"]) == 0
    assert assert_merged(out, base, peft.deltas) == len(peft.deltas)
