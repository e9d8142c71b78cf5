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
from oracle import build_adapter, build_base

from streammerge.cli import main

pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

def copy(base: Path, to: Path) -> Path:
    """A private copy of a shared fixture's base (the tokenizer is added to the copy)."""
    import shutil

    return Path(shutil.copytree(base, to))


def against_reference(base: Path, adapter: Path, root: Path, converter: Path, dtypes: tuple[str, ...] = ("q8_0",),
                      *, extra: tuple[str, ...] = (), verified: int | None = 0) -> tuple[dict, Path]:
    """Merge to safetensors (what the reference converts) and, per type, straight to GGUF with the same
    arguments; each GGUF held against the reference's file (and, unless ``verified`` is None, verify's
    exit code). The last type's metadata and file."""
    merged = root / "merged"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(merged), "-q", *extra]) == 0
    for dtype in dtypes:
        ours = root / f"ours-{dtype}.gguf"
        assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(ours), "--dtype", dtype, "-q",
                     *extra]) == 0
        kv = same_file(ours, convert(converter, merged, dtype, root / f"ref-{dtype}.gguf"), converter)
        if verified is not None:
            assert main(["verify", "--base", str(base), "--adapter", str(adapter), str(ours)]) == verified
    return kv, ours


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
    assert main(["verify", "--base", str(base), "--adapter", str(adapter), str(ours)]) == 0  # (each expert's slice)


def test_phi3_gguf_is_the_reference_converters(tmp_path: Path, converter: Path) -> None:
    """Phi-3: fused qkv_proj and gate_up_proj kept fused (attn_qkv, ffn_up), its own hyperparameters and
    SentencePiece reading (added tokens typed by their special flag alone)."""
    import json

    base = with_tokenizer(build_base("phi3", tmp_path / "phi3", dtype="bf16", sharded=True), tmp_path, beyond=False)
    (base / "tokenizer.json").write_text(json.dumps({"added_tokens": [  # (all Phi-3's converter reads of it)
        {"id": 153, "content": "<|user|>", "special": True}, {"id": 154, "content": "<|x|>", "special": False}]}))
    adapter = build_adapter(base, tmp_path / "lora", dtype="bf16", r=4, lora_alpha=8).adapter
    kv, ours = against_reference(base, adapter, tmp_path, converter, ("q8_0", "f32"), verified=None)
    assert kv["phi3.attention.sliding_window"] == 0 and kv["phi3.rope.dimension_count"] == 16
    types = dict(zip(kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]))
    assert types["<|end|>"] == 4 and types["<tool>"] == 3 and types["<unk>"] == 3  # (special: CONTROL)
    assert types["<|user|>"] == 3 and types["<|x|>"] == 4
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(read(ours, converter)[1])


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                                  {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "beta_fast": 16.0,
                                   "beta_slow": 2.0, "original_max_position_embeddings": 1024}])
def test_rope_scaling_keys_are_the_reference_converters(tmp_path: Path, converter: Path, rope: dict) -> None:
    """A Llama with linear or YaRN rope scaling, and a config.json without the keys transformers
    defaults: the scaling keys and the defaults as the converter writes them. A rope
    type llama.cpp takes as an extra tensor (llama3) is refused, nothing written."""
    import json

    base = with_tokenizer(build_base("llama", tmp_path / "base", dtype="bf16", sharded=False), tmp_path)
    config = {k: v for k, v in json.loads((base / "config.json").read_text()).items()
              if k not in ("max_position_embeddings", "head_dim")}  # (defaults the converter's AutoConfig fills in)
    (base / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    adapter = build_adapter(base, tmp_path / "lora", dtype="bf16", r=4, lora_alpha=8).adapter
    kv, _ = against_reference(base, adapter, tmp_path, converter, verified=None)
    assert kv["llama.rope.scaling.factor"] == rope["factor"] and kv["llama.rope.freq_base"] == rope["rope_theta"]
    (base / "config.json").write_text(json.dumps({**config, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}))
    again = tmp_path / "llama3.gguf"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(again), "--dtype", "q8_0", "-q"]) != 0
    assert not again.exists() and not again.with_name("llama3.gguf.partial").exists()


def test_gguf_from_a_block_fp8_base(tmp_path: Path, fp8: dict, converter: Path) -> None:
    """A quantized base (block FP8, conftest's ``fp8``, tests/test_fp8.py's): its weights decoded, merged, rounded
    once to bf16 and encoded to the GGUF type in the same pass: the reference converter's file of the
    dequantized merged checkpoint, byte for byte; verify recomputes the rows from the FP8 codes."""
    base = with_tokenizer(copy(fp8["base"], tmp_path / "fp8"), tmp_path)
    against_reference(base, fp8["peft"].adapter, tmp_path, converter)


def test_gemma2_gguf_is_the_reference_converters(tmp_path: Path, converter: Path) -> None:
    """Gemma 2: norms (and its extra post-norms) stored as 1 + w, softcapping and sliding window keys,
    and an untied lm_head left out as the converter leaves it (llama.cpp ties Gemma's head)."""
    torch.manual_seed(0)
    base = tmp_path / "gemma2"
    transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(
        **SMALL, intermediate_size=112, head_dim=16, tie_word_embeddings=False)).to(torch.bfloat16).save_pretrained(
        base, max_shard_size="60KB")
    with_tokenizer(base, tmp_path)
    adapter = build_adapter(base, tmp_path / "lora", dtype="bf16", r=4, lora_alpha=8).adapter
    kv, ours = against_reference(base, adapter, tmp_path, converter, ("q8_0", "f32"))
    assert kv["gemma2.attn_logit_softcapping"] == 50.0 and "output.weight" not in read(ours, converter)[1]


def test_gguf_from_a_4bit_base_and_with_include_exclude(tmp_path: Path, qlora: dict, converter: Path) -> None:
    """A bitsandbytes NF4 base (conftest's ``qlora``, tests/test_bnb.py's; rows of 200: Q8_0 falls back to F16 where
    32 does not divide them), and --include / --exclude: each GGUF the reference converter's file of
    the same run's safetensors output. verify, not told of the filters, finds the layers left unmerged."""
    base = with_tokenizer(copy(qlora["bases"]["nf4"], tmp_path / "nf4"), tmp_path)
    adapter = qlora["peft"].adapter
    for name, extra in (("plain", ()), ("filtered", ("--include", r"layers\.0\.", "--exclude", "down_proj"))):
        (tmp_path / name).mkdir()
        against_reference(base, adapter, tmp_path / name, converter, extra=extra, verified=0 if not extra else 7)
