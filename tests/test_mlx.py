"""mlx-lm adapters, written by mlx-lm itself: lora_a (in, r), lora_b (r, out), W + scale * (a @ b).T
with scale used as is (no /r). Held against float64 and against mlx-lm's own fuse()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import bits, build_base, exact_and_bound, read_checkpoint

from streammerge.cli import main

mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is a test extra: pip install -e '.[test]'")


def test_mlx_lm_adapter(tmp_path: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    base = build_base("llama", tmp_path / "base", dtype="fp32", sharded=False)
    model, _ = load_model(base)
    model.freeze()
    params = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    mx.random.seed(0)  # lora_a is drawn here: seeded, so that the test's files are the same on every run
    linear_to_lora_layers(model, 2, params)  # mlx initialises lora_b to zero: make the delta real
    model.load_weights([(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(model.trainable_parameters())
                        if k.endswith("lora_b")], strict=False)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    factors = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(adapter / "adapters.safetensors"), factors)
    (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                             "lora_parameters": params}))
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q"]) == 0

    import transformers

    ids = np.random.default_rng(0).integers(0, 160, size=(2, 12))
    theirs_logits = torch.from_numpy(np.array(model(mx.array(ids)).astype(mx.float32)))  # mlx-lm, adapter applied
    with torch.no_grad():
        ours_logits = transformers.AutoModelForCausalLM.from_pretrained(out)(input_ids=torch.from_numpy(ids)).logits
    assert torch.allclose(ours_logits, theirs_logits, atol=1e-4, rtol=1e-4)

    got, ref = read_checkpoint(out), read_checkpoint(base)
    fused = {name: np.array(m.fuse().weight) for name, m in model.named_modules() if hasattr(m, "lora_a")}
    assert len(fused) == 4
    for module, mlx_weight in fused.items():
        a = torch.from_numpy(np.array(factors[f"{module}.lora_a"])).double()  # (in, r)
        b = torch.from_numpy(np.array(factors[f"{module}.lora_b"])).double()  # (r, out)
        exact, bound = exact_and_bound(ref[f"{module}.weight"], [(a.t(), b.t(), 3.0)], torch.float32)
        ours = got[f"{module}.weight"].double()
        assert ((ours - exact).abs() <= bound).all(), module
        theirs = torch.from_numpy(mlx_weight).double()  # mlx rounds the delta, then the sum: also within the bound
        assert ((theirs - exact).abs() <= bound).all() and ((ours - theirs).abs() <= 2 * bound).all(), module
    untouched = [n for n in ref if n.removesuffix(".weight") not in fused]
    assert all(torch.equal(bits(got[n]), bits(ref[n])) for n in untouched)
