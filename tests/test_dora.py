"""DoRA on Linear layers: W' = m / ||W + s B A||_row * (W + s B A), streamed in row chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from oracle import DTYPES, bits, build_base, logits, read_checkpoint

from streammerge.cli import main


def dora_adapter(base: Path, root: Path, dtype: str, **lora):
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype])
    torch.manual_seed(3)
    pm = get_peft_model(model, LoraConfig(use_dora=True, init_lora_weights=False, **lora))
    expected = {}
    with torch.no_grad():
        for name, module in pm.base_model.model.named_modules():
            if "default" in getattr(module, "lora_magnitude_vector", {}):
                m = module.lora_magnitude_vector["default"].weight
                m.mul_(torch.rand_like(m) + 0.5)  # PEFT initialises m = ||W + sBA||: make the rescale real
                expected[name] = (m.double().clone(), module.lora_A["default"].weight.double(),
                                  module.lora_B["default"].weight.double(), float(module.scaling["default"]))
    pm.save_pretrained(root)
    return expected, pm


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_dora_linear(tmp_path: Path, dtype: str) -> None:
    base = build_base("qwen2", tmp_path / "base", dtype=dtype, sharded=True)
    expected, pm = dora_adapter(base, tmp_path / "adapter", dtype, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q",
                 "--max-mem", "34MiB"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    finfo = torch.finfo(DTYPES[dtype])
    for module, (m, a, b, s) in expected.items():
        w = ref[f"{module}.weight"].double()
        v = w + s * (b @ a)
        factor = (m / v.norm(dim=1)).unsqueeze(1)
        exact = factor * v
        size = factor.abs() * (w.abs() + s * (b.abs() @ a.abs()))
        _, e = torch.frexp(exact)
        bound = torch.ldexp(torch.ones_like(exact), e - 1) * finfo.eps / 2 + (4 + 2) * 2.0**-24 * size \
            + (v.shape[1] + 4) * 2.0**-24 * exact.abs()
        err = (got[f"{module}.weight"].double() - exact).abs()
        assert (err <= bound).all(), f"{module}: {float((err / bound).max()):.3f} of the bound"
    untouched = [n for n in ref if n.removesuffix(".weight") not in expected]
    assert all(torch.equal(bits(got[n]), bits(ref[n])) for n in untouched)
    merged_model = pm.merge_and_unload()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=DTYPES[dtype])
    tol = 1e-4 if dtype == "fp32" else 3e-2
    assert torch.allclose(logits(model), logits(merged_model), atol=tol, rtol=tol)
    assert main(["verify", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) == 0


def test_dora_with_another_adapter_on_the_same_weight_is_refused(tmp_path: Path, capsys) -> None:
    base = build_base("llama", tmp_path / "base", dtype="fp32", sharded=False)
    dora_adapter(base, tmp_path / "dora", "fp32", r=2, lora_alpha=4, target_modules=["q_proj"])
    dora_adapter(base, tmp_path / "dora2", "fp32", r=2, lora_alpha=4, target_modules=["q_proj"])
    rc = main(["--base", str(base), "--adapter", str(tmp_path / "dora"), "--adapter", str(tmp_path / "dora2"),
               "--output", str(tmp_path / "out"), "-q"])
    assert rc != 0 and "DoRA adapter cannot be merged together" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["embedding", "conv1d"])
def test_dora_scales_columns(tmp_path: Path, family: str) -> None:
    """DoRA on an Embedding or a GPT-2 Conv1D rescales columns of the stored weight by
    m / ||column of W + dW||: a first pass over every row chunk, then the merge."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    arch, targets = ("llama", ["embed_tokens"]) if family == "embedding" else ("gpt2", ["c_attn", "c_proj"])
    base = build_base(arch, tmp_path / "base", dtype="fp32", sharded=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(3)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                          target_modules=targets, fan_in_fan_out=family == "conv1d"))
    expected = {}
    with torch.no_grad():
        for name, module in pm.base_model.model.named_modules():
            if "default" not in getattr(module, "lora_magnitude_vector", {}):
                continue
            m = module.lora_magnitude_vector["default"].weight
            m.mul_(torch.rand_like(m) + 0.5)
            s = float(module.scaling["default"])
            if family == "embedding":  # W (vocab, dim) + s (B A).T
                a, b = module.lora_embedding_A["default"].double(), module.lora_embedding_B["default"].double()
            else:  # Conv1D W (in, out) + s (B A).T
                assert isinstance(module.get_base_layer(), Conv1D)
                a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            expected[name] = (m.double().clone(), s * (b @ a).t(), s * (b.abs() @ a.abs()).t(), a.shape[0])
    pm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q",
                 "--max-mem", "33MiB"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    assert expected
    for module, (m, delta, size, r) in expected.items():
        name = f"{module}.weight"
        v = ref[name].double() + delta
        factor = (m / v.norm(dim=0)).unsqueeze(0)
        exact = v * factor
        # one float32 rounding, the float32 arithmetic of W + dW, and float32 rounding of the column factor
        bound = (exact.abs() * 2.0**-24 + (r + 2) * 2.0**-24 * factor.abs() * (ref[name].double().abs() + size)
                 + (v.shape[0] + 4) * 2.0**-24 * exact.abs())
        err = (got[name].double() - exact).abs()
        assert (err <= bound).all(), f"{module}: {float((err / bound).max()):.2f} of the bound"
    merged = pm.merge_and_unload()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(model), logits(merged), atol=1e-4, rtol=1e-4)
    assert main(["verify", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) == 0
