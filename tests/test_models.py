"""End to end on tiny real models: transformers builds the base, PEFT builds the adapter and its
own merge; streammerge's output is held against PEFT and against float64."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from oracle import (DTYPES, assert_merged, bits, build_adapter, build_base, exact_and_bound, logits,
                    read_checkpoint, tree_digest)

from streammerge.cli import main

CASES = [(arch, dtype, sharded) for arch in ("llama", "qwen2") for dtype in ("bf16", "fp16", "fp32")
         for sharded in (True, False)]


def run_cli(*args: object) -> int:
    return main([str(a) for a in args] + ["-q"])


@pytest.mark.parametrize("arch,dtype,sharded", CASES, ids=[f"{a}-{d}-{'sharded' if s else 'single'}" for a, d, s in CASES])
def test_merge_matches_peft_and_float64(tmp_path: Path, arch: str, dtype: str, sharded: bool) -> None:
    import transformers

    base = build_base(arch, tmp_path / "base", dtype=dtype, sharded=sharded)
    peft = build_adapter(base, tmp_path / "adapter", dtype=dtype, r=4, lora_alpha=8)
    before = tree_digest(base)
    out = tmp_path / "out"
    assert run_cli("--base", base, "--adapter", peft.adapter, "--output", out) == 0

    # 1. float64: merged elements within one rounding, untouched tensors bit-identical
    assert assert_merged(out, base, peft.deltas) == len(peft.deltas) == 14
    # 2. PEFT's merge_and_unload: within one ulp of the dtype everywhere
    ours = read_checkpoint(out)
    for name, ref in peft.merged.state_dict().items():
        if name in ours:
            diff = (ours[name].double() - ref.double()).abs()
            assert (diff <= ref.double().abs() * torch.finfo(DTYPES[dtype]).eps + 1e-30).all(), name
    # 3. the output loads like the base and gives PEFT's logits
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[dtype])
    ref_logits, got_logits = logits(peft.merged), logits(model)
    tol = 1e-5 if dtype == "fp32" else 2e-2
    assert torch.allclose(got_logits, ref_logits, atol=tol, rtol=tol)
    # 4. a checkpoint laid out like the base: same files, exact index, format metadata, base untouched
    base_files = {p.name for p in base.iterdir()}
    assert {p.name for p in out.iterdir()} == base_files | {"streammerge.json", "README.md"}  # + the model card
    manifest = json.loads((out / "streammerge.json").read_text())
    shards = {p.name for p in out.glob("*.safetensors")}
    assert manifest["shards"] == {s: {"size": (out / s).stat().st_size,
                                      "sha256": hashlib.sha256((out / s).read_bytes()).hexdigest()} for s in shards}
    assert manifest["tensors_merged"] == sorted(f"{m}.weight" for m in peft.deltas)
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        base_index = json.loads((base / "model.safetensors.index.json").read_text())
        shard_bytes = sum((out / s).stat().st_size for s in set(index["weight_map"].values()))
        assert index["weight_map"] == base_index["weight_map"]
        data = sum(t.numel() * t.element_size() for t in ours.values())
        assert index["metadata"]["total_size"] == data < shard_bytes
    for shard in (p for p in out.iterdir() if p.suffix == ".safetensors"):
        from safetensors import safe_open

        with safe_open(shard, "pt") as f:
            assert f.metadata()["format"] == "pt"
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert tree_digest(base) == before


def test_float64_bound_rejects_double_rounding(tmp_path: Path) -> None:
    """The oracle can fail: rounding the delta to bf16 before adding breaks the one-rounding bound."""
    torch.manual_seed(0)
    w = (torch.randn(64, 64) * 0.02).to(torch.bfloat16)
    a, b = torch.randn(4, 64).double() * 0.1, torch.randn(64, 4).double() * 0.1
    exact, bound = exact_and_bound(w, [(a, b, 2.0)], torch.bfloat16)
    single = (w.float() + (2.0 * (b @ a)).float()).to(torch.bfloat16)
    double = w + (2.0 * (b @ a)).to(torch.bfloat16)
    assert ((single.double() - exact).abs() <= bound).all()
    assert ((double.double() - exact).abs() > bound).any()


def test_tied_embeddings_and_extra_files(tmp_path: Path) -> None:
    """A tied checkpoint (no lm_head on disk) merges; tokenizer, templates and *.py are copied as is."""
    base = build_base("llama", tmp_path / "base", dtype="bf16", sharded=True, tie=True)
    extras = {
        "tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}", "special_tokens_map.json": '{"eos_token": "</s>"}',
        "vocab.json": "{}", "merges.txt": "#version: 0.2\n", "chat_template.jinja": "{{ messages }}",
        "preprocessor_config.json": "{}", "modeling_custom.py": "# remote code\n",
        "additional_chat_templates/tool_use.jinja": "{{ tools }}",
    }
    for rel, text in extras.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    peft = build_adapter(base, tmp_path / "adapter", dtype="bf16", r=2, lora_alpha=4,
                         target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    assert run_cli("--base", base, "--adapter", peft.adapter, "--output", out) == 0
    assert "lm_head.weight" not in read_checkpoint(out)
    assert assert_merged(out, base, peft.deltas) == 4
    for rel, text in extras.items():
        assert (out / rel).read_text() == text
    assert not any(p.name.startswith("adapter") for p in out.rglob("*"))


@pytest.mark.parametrize("src,dst", [("bf16", "fp32"), ("fp32", "bf16"), ("bf16", "fp16")])
def test_dtype_conversion_updates_config(tmp_path: Path, src: str, dst: str) -> None:
    base = build_base("qwen2", tmp_path / "base", dtype=src, sharded=True)
    peft = build_adapter(base, tmp_path / "adapter", dtype=src, r=4, lora_alpha=16)
    out = tmp_path / "out"
    assert run_cli("--base", base, "--adapter", peft.adapter, "--output", out, "--dtype", dst) == 0
    assert_merged(out, base, peft.deltas, out_dtype=DTYPES[dst])
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == str(DTYPES[dst]).removeprefix("torch.")


def test_rslora_and_rank_alpha_patterns(tmp_path: Path) -> None:
    """Scaling exactly as PEFT defines it: rsLoRA, and per-module r / alpha by regex."""
    base = build_base("llama", tmp_path / "base", dtype="fp32", sharded=False)
    peft = build_adapter(base, tmp_path / "adapter", dtype="fp32", r=4, lora_alpha=8, use_rslora=True,
                         rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
                         alpha_pattern={"v_proj": 3, r"model\.layers\.0\.mlp\..*": 5})
    scales = {m: d[0][2] for m, d in peft.deltas.items()}
    assert len(set(scales.values())) >= 4  # the patterns really produce different scalings
    out = tmp_path / "out"
    assert run_cli("--base", base, "--adapter", peft.adapter, "--output", out) == 0
    assert_merged(out, base, peft.deltas)


def test_legacy_bin_adapter(tmp_path: Path) -> None:
    base = build_base("qwen2", tmp_path / "base", dtype="bf16", sharded=False)
    peft = build_adapter(base, tmp_path / "adapter", dtype="bf16", r=4, lora_alpha=8, save_bin=True)
    assert (peft.adapter / "adapter_model.bin").exists()
    out = tmp_path / "out"
    assert run_cli("--base", base, "--adapter", peft.adapter, "--output", out) == 0
    assert_merged(out, base, peft.deltas)


def test_weighted_adapters_sum_with_one_rounding(tmp_path: Path) -> None:
    base = build_base("llama", tmp_path / "base", dtype="bf16", sharded=True)
    one = build_adapter(base, tmp_path / "a1", dtype="bf16", seed=1, r=4, lora_alpha=8)
    two = build_adapter(base, tmp_path / "a2", dtype="bf16", seed=2, r=2, lora_alpha=2, target_modules=["q_proj"])
    out = tmp_path / "out"
    assert run_cli("--base", base, "--adapter", f"{one.adapter}:0.7", "--adapter", f"{two.adapter}:0.3",
                   "--output", out) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    for module, deltas in one.deltas.items():
        name = f"{module}.weight"
        both = deltas + two.deltas.get(module, [])
        weights = [0.7] + [0.3] * len(two.deltas.get(module, []))
        exact, bound = exact_and_bound(ref[name], both, torch.bfloat16, weights)
        assert ((got[name].double() - exact).abs() <= bound).all(), name
    untouched = [n for n in ref if n.removesuffix(".weight") not in one.deltas]
    assert untouched and all(torch.equal(bits(got[n]), bits(ref[n])) for n in untouched)
