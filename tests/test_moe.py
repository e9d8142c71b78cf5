"""MoE: LoRA on fused expert parameters (PEFT target_parameters on transformers v5 experts,
(E, 2I, H) gate_up_proj and (E, H, I) down_proj in memory) merged into the per-expert tensors
that checkpoints keep on disk (Qwen3-MoE gate/up/down_proj, Mixtral w1/w3/w2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from oracle import bits, exact_and_bound, logits, read_checkpoint

from streammerge.cli import main

SMALL = dict(vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "qwen3-moe": (lambda: transformers.Qwen3MoeConfig(**SMALL, intermediate_size=112, moe_intermediate_size=48,
                                                      num_experts=4, num_experts_per_tok=2, head_dim=16),
                  "model.layers.{l}.mlp.experts.{e}.{p}.weight", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "mixtral": (lambda: transformers.MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=4,
                                                   num_experts_per_tok=2),
                "model.layers.{l}.block_sparse_moe.experts.{e}.{p}.weight", {"gate": "w1", "up": "w3", "down": "w2"}),
}


def expected_deltas(pm, disk: str, parts: dict[str, str]) -> dict[str, list]:
    """Per-expert disk tensor -> [(A', B', 1.0)] with B' A' = PEFT's own einsum of its factors, in float64."""
    from peft.tuners.lora.layer import ParamWrapper

    out: dict[str, list] = {}
    for name, module in pm.base_model.model.named_modules():
        if not isinstance(module, ParamWrapper) or "default" not in module.lora_A or module.parameter_name == "weight":
            continue  # (a wrapped 2-D weight, as the router: not experts)
        layer = int(name.split(".layers.")[1].split(".")[0])
        a = module.lora_A["default"].weight.detach().double()
        b = module.lora_B["default"].weight.detach().double()
        n, s = module.num_experts, float(module.scaling["default"])
        a3, b3 = a.reshape(n, -1, a.shape[-1]), b.reshape(b.shape[0], -1, n)
        for e in range(n):  # expert e: B3[:, :, e] (out, r) @ A3[e] (r, in), as PEFT's "o r e, e r i -> e o i"
            be, ae = b3[:, :, e] * s, a3[e]
            if module.parameter_name == "gate_up_proj":
                half = be.shape[0] // 2
                out[disk.format(l=layer, e=e, p=parts["gate"])] = [(ae, be[:half], 1.0)]
                out[disk.format(l=layer, e=e, p=parts["up"])] = [(ae, be[half:], 1.0)]
            else:
                out[disk.format(l=layer, e=e, p=parts["down"])] = [(ae, be, 1.0)]
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_experts_merge_per_expert(tmp_path: Path, family: str) -> None:
    from peft import LoraConfig, get_peft_model

    make_config, disk, parts = FAMILIES[family]
    torch.manual_seed(0)
    base = tmp_path / "base"
    transformers.AutoModelForCausalLM.from_config(make_config()).save_pretrained(base, max_shard_size="60KB")
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q",
                 "--max-mem", "40MiB"]) == 0
    want = expected_deltas(pm, disk, parts)
    assert len(want) == 2 * 4 * 3  # layers x experts x (gate, up, down): none dropped
    got, ref = read_checkpoint(out), read_checkpoint(base)
    for name, deltas in want.items():
        exact, bound = exact_and_bound(ref[name], deltas, torch.float32)
        assert ((got[name].double() - exact).abs() <= bound).all(), name
    changed = {n for n in ref if not torch.equal(bits(got[n]), bits(ref[n]))}
    assert changed == set(want) | {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(merged), logits(pm), atol=1e-4, rtol=1e-4)
    assert main(["verify", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_expert_lora_modules(tmp_path: Path, family: str) -> None:
    """Adapters trained before transformers 5 fused the experts hold one LoRA per expert Linear
    ('...experts.3.gate_proj' / Mixtral '...block_sparse_moe.experts.3.w1'). transformers 5 can no
    longer build such a model, so the adapter is written here in PEFT's key format; the oracle is
    float64 only. Every expert of every layer must be merged: none may be dropped."""
    import json

    from safetensors.torch import save_file

    make_config, disk, parts = FAMILIES[family]
    torch.manual_seed(0)
    base = tmp_path / "base"
    transformers.AutoModelForCausalLM.from_config(make_config()).save_pretrained(base)
    ref = read_checkpoint(base)
    gen = torch.Generator().manual_seed(1)
    adapter, tensors, deltas = tmp_path / "adapter", {}, {}
    for layer in range(2):
        for e in range(4):
            for part in parts.values():
                name = disk.format(l=layer, e=e, p=part)
                out_f, in_f = ref[name].shape
                a, b = torch.randn(2, in_f, generator=gen), torch.randn(out_f, 2, generator=gen)
                tensors[f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"] = a
                tensors[f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight"] = b
                deltas[name] = [(a.double(), b.double(), 2.0)]
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q"]) == 0
    got = read_checkpoint(out)
    for name, d in deltas.items():
        exact, bound = exact_and_bound(ref[name], d, torch.float32)
        assert ((got[name].double() - exact).abs() <= bound).all(), name
    assert {n for n in ref if not torch.equal(bits(got[n]), bits(ref[n]))} == set(deltas)


ROUTERS = {"qwen3-moe": "model.layers.{l}.mlp.gate.weight", "mixtral": "model.layers.{l}.block_sparse_moe.gate.weight"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_linear_on_moe_as_peft_expands_it(tmp_path: Path, family: str) -> None:
    """PEFT's ``all-linear`` on a transformers v5 MoE targets the fused experts by bare parameter names
    ('gate_up_proj', 'down_proj') with gate_up's rank doubled by a rank_pattern matched against
    '<experts>.gate_up_proj' (not the module path), and the router as a wrapped 'gate.weight'. With
    rsLoRA the doubled rank changes the scaling too. Every expert, the router and the attention
    projections merged as PEFT's factors say, in float64; logits as PEFT's model's."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import ParamWrapper

    make_config, disk, parts = FAMILIES[family]
    torch.manual_seed(0)
    base = tmp_path / "base"
    transformers.AutoModelForCausalLM.from_config(make_config()).save_pretrained(base)
    torch.manual_seed(1)
    pm = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=2, lora_alpha=6, use_rslora=True, target_modules="all-linear", init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    assert {v for v in pm.peft_config["default"].rank_pattern.values()} == {4}  # (gate_up: 2 r)
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q"]) == 0
    want = expected_deltas(pm, disk, parts)
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, ParamWrapper) and module.parameter_name == "weight":  # the router
            layer = int(name.split(".layers.")[1].split(".")[0])
            a, b = (module.lora_A["default"].weight.detach().double(), module.lora_B["default"].weight.detach().double())
            want[ROUTERS[family].format(l=layer)] = [(a, b, float(module.scaling["default"]))]
        elif hasattr(module, "lora_A") and not isinstance(module, ParamWrapper) and "default" in module.lora_A:
            a, b = (module.lora_A["default"].weight.detach().double(), module.lora_B["default"].weight.detach().double())
            want[f"{name}.weight"] = [(a, b, float(module.scaling["default"]))]
    assert len(want) == 2 * 4 * 3 + 2 + 2 * 4  # experts, routers, q/k/v/o
    got, ref = read_checkpoint(out), read_checkpoint(base)
    for name, deltas in want.items():
        exact, bound = exact_and_bound(ref[name], deltas, torch.float32)
        assert ((got[name].double() - exact).abs() <= bound).all(), name
    assert {n for n in ref if not torch.equal(bits(got[n]), bits(ref[n]))} == set(want)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(merged), logits(pm), atol=1e-4, rtol=1e-4)
