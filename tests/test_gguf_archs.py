"""GGUF of the architectures whose tensors are not one-to-one with the checkpoint's (issue 14):
MoE experts, kept one tensor an expert on disk, stacked into ``ffn_*_exps`` (Mixtral, which converts
as llama; Qwen2-MoE with its shared expert; Qwen3-MoE), held byte for byte against llama.cpp's own
converter run on streammerge's safetensors output of the same merge (tests/gguf_ref.py).

Adapters: PEFT LoRA on every linear layer and on the fused experts (``target_parameters``), every
factor random. The Qwen MoE converters read the tokenizer as BPE only: a home-made tokenizer.json,
its pre-tokenizer named with --gguf-pre (and the reference's fingerprint lookup answering the same).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from gguf_ref import convert, read, same_file, with_bpe_tokenizer, with_tokenizer

from streammerge.cli import main

pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

SMALL = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MOE = {  # model -> (config, tokenizer kind, --gguf-pre)
    "mixtral": (lambda: transformers.MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=4,
                                                   num_experts_per_tok=2), "spm", None),
    "qwen2_moe": (lambda: transformers.Qwen2MoeConfig(**SMALL, intermediate_size=112, moe_intermediate_size=32,
                                                      shared_expert_intermediate_size=48, num_experts=4,
                                                      num_experts_per_tok=2), "bpe", "qwen2"),
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(**SMALL, intermediate_size=112, moe_intermediate_size=32,
                                                      num_experts=4, num_experts_per_tok=2, head_dim=16), "bpe", "qwen2"),
}


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    """Per model: the bf16 base (sharded), a random LoRA on the linear layers and the experts, the merge."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gguf-moe")
    made = {}
    for name, (config, kind, _) in MOE.items():
        torch.manual_seed(0)
        base = root / name
        transformers.AutoModelForCausalLM.from_config(config()).to(torch.bfloat16).save_pretrained(
            base, max_shard_size="60KB")
        with_tokenizer(base, root) if kind == "spm" else with_bpe_tokenizer(base)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(
            r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False,
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        peft_model.save_pretrained(root / f"{name}-lora")
        merged = root / f"{name}-merged"
        assert main(["--base", str(base), "--adapter", str(root / f"{name}-lora"), "--output", str(merged), "-q"]) == 0
        made[name] = base, root / f"{name}-lora", merged
    return made


@pytest.mark.parametrize("name, dtype", [("mixtral", "q8_0"), ("mixtral", "f32"), ("qwen2_moe", "q8_0"),
                                         ("qwen2_moe", "bf16"), ("qwen3_moe", "q8_0")])
def test_moe_gguf_is_the_reference_converters(tmp_path: Path, moe: dict, converter: Path, name: str,
                                              dtype: str) -> None:
    base, adapter, merged = moe[name]
    pre = MOE[name][2]
    ours = tmp_path / "ours.gguf"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(ours), "--dtype", dtype, "-q",
                 *(["--gguf-pre", pre] if pre else [])]) == 0
    kv = same_file(ours, convert(converter, merged, dtype, tmp_path / "ref.gguf", pre=pre), converter)
    tensors = read(ours, converter)[1]
    stacks = {n: v for n, v in tensors.items() if "_exps" in n}
    assert len(stacks) == 2 * 3 and all(v[1][-1] == 4 for v in stacks.values())  # layers x (gate, up, down), 4 experts
    assert kv[f"{kv['general.architecture']}.expert_count"] == 4
    assert tensors["blk.0.ffn_gate_inp.weight"][0] == "F32"  # (the router, as the converter keeps it)
