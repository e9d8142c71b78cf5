"""Test oracles: tiny real models built with transformers, adapters made with PEFT, and the
float64 recomputation every merged tensor is held against.

The expected deltas come from the PEFT model in memory (its lora_A/lora_B weights and its own
``scaling``), never from streammerge's parsing, so the oracle is independent of the code under test.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tiny_config(arch: str, *, tie: bool = False) -> Any:
    import transformers

    common = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "gemma":
        return transformers.GemmaConfig(**{**common, "tie_word_embeddings": True}, head_dim=16)
    if arch == "mistral":
        return transformers.MistralConfig(**common, head_dim=16)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16)
    if arch == "phi3":
        return transformers.Phi3Config(**common, pad_token_id=0)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=160, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       tie_word_embeddings=True)
    raise ValueError(arch)


def build_base(arch: str, root: Path, *, dtype: str, sharded: bool, tie: bool = False, seed: int = 0) -> Path:
    """Save a randomly initialised tiny model with transformers' own save_pretrained."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, tie=tie)).to(DTYPES[dtype])
    model.save_pretrained(root, max_shard_size="40KB" if sharded else "1GB")
    assert (root / "model.safetensors.index.json").exists() == sharded
    return root


@dataclass
class PeftResult:
    adapter: Path
    deltas: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]  # module -> [(A64, B64, scaling)]
    merged: Any  # PEFT merge_and_unload() model, for logits and state comparisons


def build_adapter(base: Path, root: Path, *, dtype: str, seed: int = 1, save_bin: bool = False,
                  auto_class: Any = None, **lora: Any) -> PeftResult:
    """Train-free PEFT adapter with random non-zero A and B (init_lora_weights=False)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = (auto_class or transformers.AutoModelForCausalLM).from_pretrained(base, dtype=DTYPES[dtype])
    torch.manual_seed(seed)
    lora.setdefault("target_modules", "all-linear")
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    from transformers.pytorch_utils import Conv1D

    deltas: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for name, module in peft_model.base_model.model.named_modules():
        if "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach().double()
            b = module.lora_B["default"].weight.detach().double()
            if isinstance(module.get_base_layer(), Conv1D):  # weight (in, out): W += (B A).T = A.T B.T
                a, b = b.t(), a.t()
        elif "default" in getattr(module, "lora_embedding_A", {}):  # W (vocab, dim) += (B A).T
            a = module.lora_embedding_B["default"].detach().double().t()
            b = module.lora_embedding_A["default"].detach().double().t()
        else:
            continue
        deltas[name] = [(a.contiguous(), b.contiguous(), float(module.scaling["default"]))]
    assert deltas, "PEFT adapted nothing"
    peft_model.save_pretrained(root, safe_serialization=not save_bin)
    merged = peft_model.merge_and_unload()
    return PeftResult(root, deltas, merged)


def odd_llama(root: Path, *, hidden: int, intermediate: int, dtype: str, targets: list[str]) -> tuple[Any, PeftResult]:
    """A tiny real Llama whose dimensions are not multiples of the quantization blocks (k/v: hidden/2),
    saved in ``root / dtype``, and a random LoRA on ``targets`` (r=4, alpha 8): quantized-base fixtures."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=160, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(DTYPES[dtype]).save_pretrained(root / dtype)
    return config, build_adapter(root / dtype, root / "adapter", dtype=dtype, r=4, lora_alpha=8, target_modules=targets)


def read_checkpoint(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint, read with the safetensors library itself."""
    index = root / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(root / shard, "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.element_size()])


def exact_and_bound(w: torch.Tensor, deltas: list[tuple[torch.Tensor, torch.Tensor, float]],
                    out_dtype: torch.dtype, weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``W + sum w_i s_i B_i A_i`` and the largest error one correct rounding may leave.

    Bound = half an ulp of the output dtype at the exact value (the single rounding) + the float32
    accumulation bound (r + 2) * 2^-24 * (|W| + sum |w_i s_i| |B_i| |A_i|) for the float32 arithmetic.
    A double rounding (delta rounded to the output dtype before the add) breaks this bound.
    """
    exact = w.double().clone()
    magnitude = w.double().abs()
    r_max = 0
    for i, (a, b, s) in enumerate(deltas):
        k = s * (weights[i] if weights else 1.0)
        exact += k * (b @ a)
        magnitude += abs(k) * (b.abs() @ a.abs())
        r_max = max(r_max, a.shape[0])
    _, e = torch.frexp(exact)
    finfo = torch.finfo(out_dtype)
    ulp = torch.ldexp(torch.ones_like(exact), (e - 1)) * finfo.eps
    ulp = ulp.clamp_min(finfo.smallest_normal * finfo.eps)
    bound = ulp / 2 + (r_max + 2) * 2.0**-24 * magnitude + 1e-300
    return exact, bound


def assert_merged(out: Path, base: Path, deltas: dict[str, list], *, out_dtype: torch.dtype | None = None,
                  weights: list[float] | None = None) -> int:
    """Output tensor set == base; merged tensors within the one-rounding bound; others bit-identical."""
    got, ref = read_checkpoint(out), read_checkpoint(base)
    assert set(got) == set(ref)
    merged = 0
    for name, w in ref.items():
        o = got[name]
        want_dtype = out_dtype if out_dtype is not None and w.is_floating_point() else w.dtype
        assert o.dtype == want_dtype and o.shape == w.shape, name
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in deltas:
            exact, bound = exact_and_bound(w, deltas[module], o.dtype, weights)
            err = (o.double() - exact).abs()
            assert (err <= bound).all(), f"{name}: max error {err.max():.3e} above bound"
            merged += 1
        elif o.dtype == w.dtype:
            assert torch.equal(bits(o), bits(w)), f"untouched {name} changed"
        else:
            assert torch.equal(bits(o), bits(w.to(o.dtype))), f"{name} not converted exactly"
    assert merged == sum(1 for m in deltas if f"{m}.weight" in ref)
    return merged


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove the base is byte-identical afterwards)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def logits(model: Any, seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (2, 12))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def disk_names(model: Any, saved: Path) -> dict[str, str]:
    """In-memory parameter name -> on-disk tensor name, matched by value (independent of any
    renaming table): ``saved`` is ``model`` written by transformers' own save_pretrained."""
    on_disk = read_checkpoint(saved)
    by_bytes: dict[bytes, list[str]] = {}
    for name, t in on_disk.items():
        by_bytes.setdefault(bits(t).numpy().tobytes(), []).append(name)
    out = {}
    for name, p in model.state_dict().items():
        hits = by_bytes.get(bits(p.detach()).numpy().tobytes(), [])
        if len(hits) == 1:
            out[name] = hits[0]
    return out


def reports(stdout: str) -> list[dict[str, Any]]:
    """The reports of ``streammerge ... --json`` (one JSON object: {"exit_code": 0, "outputs": [...]})."""
    doc = json.loads(stdout)
    assert doc["exit_code"] == 0 and isinstance(doc["outputs"], list), doc
    return doc["outputs"]


def report(stdout: str) -> dict[str, Any]:
    """The report of a merge into one output."""
    (only,) = reports(stdout)
    return only
