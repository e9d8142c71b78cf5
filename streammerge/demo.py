"""The built-in example: a tiny Llama-shaped checkpoint and a PEFT-format LoRA adapter, written
with safetensors alone (no network, no transformers), merged under a small memory budget and
checked against a float64 recomputation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import OutputError, StreamMergeError

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS, RANK, ALPHA = 256, 512, 2, 1024, 4, 2, 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MARKER = ".streammerge-demo"


def _shapes() -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    proj = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV_HEADS * head, HIDDEN), "v_proj": (KV_HEADS * head, HIDDEN),
            "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
            "down_proj": (HIDDEN, INTER)}
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        for name, shape in proj.items():
            group = "self_attn" if name in TARGETS[:4] else "mlp"
            shapes[f"model.layers.{i}.{group}.{name}.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_base(root: Path, *, seed: int = 0) -> None:
    """A two-shard bf16 checkpoint with a Llama config that transformers can load."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in _shapes().items()}
    names = list(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    root.mkdir(parents=True)
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, root / shard, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in tensors.values())},
             "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def write_adapter(root: Path, *, seed: int = 1) -> None:
    """A PEFT-format LoRA on every linear layer, with non-zero B so the delta is real."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in _shapes().items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_features, in_features = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, in_features, generator=gen) * 0.05
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, RANK, generator=gen) * 0.05
    root.mkdir(parents=True)
    save_file(tensors, root / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS),
              "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "task_type": "CAUSAL_LM"}
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2))


def check_against_float64(base: Path, adapter: Path, output: Path, scaling: float) -> int:
    """Every merged element within one bf16 rounding of float64; every other tensor bit-identical."""
    index = json.loads((base / "model.safetensors.index.json").read_text())
    with safe_open(adapter / "adapter_model.safetensors", "pt") as ad:
        factors = {k: ad.get_tensor(k) for k in ad.keys()}
    checked = 0
    for name, shard in index["weight_map"].items():
        with safe_open(base / shard, "pt") as b, safe_open(output / shard, "pt") as o:
            w, got = b.get_tensor(name), o.get_tensor(name)
        a_key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if a_key not in factors:
            if not torch.equal(w.view(torch.int16), got.view(torch.int16)):
                raise StreamMergeError(f"demo check failed: untouched {name} differs from the base")
            continue
        b_key = a_key.replace("lora_A", "lora_B")
        a, b = factors[a_key].double(), factors[b_key].double()
        exact = w.double() + scaling * (b @ a)
        # one bf16 rounding of the result, plus the float32 dot-product bound (r + 2) * 2^-24 * sum|terms|
        ulp = exact.to(torch.bfloat16).double().abs() * 2.0**-7
        fp32 = (RANK + 2) * 2.0**-24 * (w.double().abs() + scaling * (b.abs() @ a.abs()))
        if ((got.double() - exact).abs() > ulp + fp32 + 2.0**-133).any():
            raise StreamMergeError(f"demo check failed: {name} is not within one bf16 rounding of float64")
        checked += 1
    return checked


def run_demo(workdir: Path, *, max_mem: int) -> dict[str, Any]:
    """Build, merge with streammerge's own API, check; return the merge report as a dict."""
    from .api import merge

    if workdir.exists():
        if not (workdir / MARKER).exists():
            raise OutputError(f"{workdir} exists and was not made by 'streammerge demo'; choose another directory")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).touch()
    base, adapter, output = workdir / "base", workdir / "adapter", workdir / "merged"
    write_base(base)
    write_adapter(adapter)
    report = merge(base, [adapter], output=output, device="cpu", max_mem=max_mem, progress=False)
    check_against_float64(base, adapter, output, ALPHA / RANK)
    return report.to_dict()
