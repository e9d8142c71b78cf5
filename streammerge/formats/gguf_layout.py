"""What a GGUF file of a merged checkpoint holds, from the plan alone: each tensor's GGUF name, type,
shape, byte size and row order, and the metadata llama.cpp reads (``gguf_meta.py``).

Facts taken from llama.cpp's converter (``convert_hf_to_gguf.py``), written here as tables:
- names: gguf's ``TensorNameMap`` for the architecture (``.weight`` / ``.bias`` suffixes kept);
- types: 1-D tensors and ``*_norm.weight`` are F32; so are the router and position embeddings and
  any name not ending in ``.weight``; the rest take the file type's (f32, f16, bf16, q8_0; q4_0, q4_1,
  q5_0 and q5_1, which the converter does not write, by the same rules); a quantized type whose
  block does not divide the row falls back to F16; tensors are widened to
  float32 before conversion unless they are F16 or F32 already (as the converter reads them);
- llama's (and Mistral's) q / k rows are permuted for the rotary layout: within each head, row
  ``a * half + b`` (a in {0, 1}, b < half = head_dim / 2) goes to ``b * 2 + a`` (k with the KV heads);
- MoE experts, kept per expert in the checkpoint, are stacked into one 3-D tensor a layer and a
  projection (expert e's rows after expert e - 1's: each expert's bytes are a slice of the tensor's,
  so the stack streams), named as the converter names the stack before mapping it (``Stack``).
Architectures are rows of ``ARCHS``; a base of another ``model_type`` is refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError

if TYPE_CHECKING:
    from ..plan.types import MergePlan

# --dtype for a GGUF output -> (llama.cpp's file type name, the GGML type of the quantized tensors)
OUTTYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
            "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "q4_0": ("MOSTLY_Q4_0", "Q4_0"), "q4_1": ("MOSTLY_Q4_1", "Q4_1"),
            "q5_0": ("MOSTLY_Q5_0", "Q5_0"), "q5_1": ("MOSTLY_Q5_1", "Q5_1")}
ALIASES = {"fp32": "f32", "fp16": "f16"}
ALWAYS_F32 = ("FFN_GATE_INP", "FFN_GATE_INP_SHEXP", "POS_EMBD", "TOKEN_TYPES")  # gguf MODEL_TENSOR names


@dataclass(frozen=True)
class Stack:
    """Per-expert checkpoint tensors (``pattern``, groups layer / expert / part) -> the stacked tensor's
    name as the converter forms it before its name map (``stacked``, formatted with layer and part)."""

    pattern: str
    stacked: str

    def match(self, name: str) -> tuple[str, int] | None:
        """(stacked name, expert) of a per-expert tensor; None for any other tensor."""
        m = re.fullmatch(self.pattern, name)
        return (self.stacked.format(layer=m["layer"], part=m["part"]), int(m["expert"])) if m else None


QWEN_EXPERTS = Stack(r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<part>\w+_proj)\.weight",
                     "model.layers.{layer}.mlp.experts.{part}.weight")
MIXTRAL_EXPERTS = Stack(r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<part>w[123])\.weight",
                        "layers.{layer}.feed_forward.experts.{part}.weight")


@dataclass(frozen=True)
class Arch:
    """One architecture as llama.cpp's converter writes it."""

    name: str  # gguf MODEL_ARCH member
    permute_qk: bool = False  # llama's rotary layout
    llama_hparams: bool = False  # {arch}.vocab_size and rope.dimension_count written (llama's converter)
    norms_plus_one: bool = False  # Gemma: every "*norm.weight" stored as 1 + w
    hparams: str = "text"  # which set of {arch}.* keys the converter writes ("text": its base class's; "gemma", ...)
    vocab: str = "spm"  # "spm": tokenizer.model when there is one, else tokenizer.json; "bpe": tokenizer.json only;
    # "phi3": tokenizer.model, with tokenizer.json's added tokens too
    experts: Stack | None = None  # MoE: how per-expert tensors stack
    drop: tuple[str, ...] = ()  # checkpoint tensors the converter leaves out (Gemma's lm_head: the head is tied)


LLAMA = Arch("LLAMA", permute_qk=True, llama_hparams=True)
ARCHS = {"llama": LLAMA, "mistral": LLAMA, "mixtral": replace(LLAMA, experts=MIXTRAL_EXPERTS),
         "qwen2": Arch("QWEN2"), "qwen3": Arch("QWEN3"),
         "qwen2_moe": Arch("QWEN2MOE", vocab="bpe", experts=QWEN_EXPERTS, hparams="qwen2moe"),
         "qwen3_moe": Arch("QWEN3MOE", vocab="bpe", experts=QWEN_EXPERTS, hparams="qwen2moe"),
         "gemma": Arch("GEMMA", norms_plus_one=True, hparams="gemma", drop=("lm_head.weight",)),
         "gemma2": Arch("GEMMA2", norms_plus_one=True, hparams="gemma2", drop=("lm_head.weight",)),
         "phi3": Arch("PHI3", hparams="phi3", vocab="phi3")}  # (fused qkv_proj / gate_up_proj: attn_qkv / ffn_up)


@dataclass
class GgufTensor:
    """Where one checkpoint tensor goes: a whole GGUF tensor, or expert ``index`` of a stack of ``count``."""

    name: str  # in the checkpoint
    gguf_name: str
    qtype: str  # GGMLQuantizationType member
    shape: tuple[int, ...]  # as in the checkpoint (rows first)
    nbytes: int
    heads: int = 0  # > 0: rows permuted in groups of shape[0] // heads
    plus_one: bool = False  # stored as 1 + w (Gemma's norms)
    index: int = 0  # its place in the stack
    count: int = 1  # tensors stacked into gguf_name (experts)
    offset: int = 0  # of its bytes in the data section

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        return (self.count, *self.shape) if self.count > 1 else self.shape


@dataclass
class GgufLayout:
    arch: Arch
    arch_name: str  # gguf's architecture string
    file_type: str
    tensors: dict[str, GgufTensor] = field(default_factory=dict)  # by checkpoint name, in file order

    def files(self) -> dict[str, list[GgufTensor]]:
        """Each GGUF tensor's parts (one, or the stacked experts in order), in file order."""
        out: dict[str, list[GgufTensor]] = {}
        for t in self.tensors.values():
            out.setdefault(t.gguf_name, []).append(t)
        for parts in out.values():
            parts.sort(key=lambda t: t.index)
        return out


def outtype(dtype: str) -> str:
    name = ALIASES.get(dtype, dtype)
    if name not in OUTTYPES:
        raise UnsupportedError(f"--dtype {dtype!r} is not a GGUF type this version writes ({', '.join(OUTTYPES)})")
    return name


def layout(plan: MergePlan, dtype: str, config: dict[str, Any]) -> GgufLayout:
    """Names, types and sizes of every tensor of the GGUF output of ``plan`` (refusals by name)."""
    import gguf

    model_type = str(config.get("model_type"))
    if model_type not in ARCHS:
        raise UnsupportedError(f"GGUF output of a {model_type!r} model is not written by this version "
                               f"({', '.join(sorted(ARCHS))} are)")
    arch = ARCHS[model_type]
    member = getattr(gguf.MODEL_ARCH, arch.name)
    blocks = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(member, blocks)
    file_type, quantized = OUTTYPES[outtype(dtype)]
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or
                                                               config["num_attention_heads"])
    out = GgufLayout(arch, gguf.MODEL_ARCH_NAMES[member], file_type)
    always_f32 = [getattr(gguf.MODEL_TENSOR, t) for t in ALWAYS_F32]
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    for t in plan.tensors():
        if t.name in arch.drop:
            continue
        if len(t.info.shape) > 2:
            raise UnsupportedError(f"GGUF: tensor {t.name!r} has {len(t.info.shape)} dimensions; this version writes "
                                   "experts kept one tensor an expert, as transformers saves them")
        stacked = arch.experts.match(t.name) if arch.experts else None
        gguf_name = names.get_name(stacked[0] if stacked else t.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedError(f"GGUF: tensor {t.name!r} has no name in llama.cpp's {out.arch_name} layout")
        qtype = _qtype(gguf, gguf_name, t.info.shape, quantized, always_f32, member, blocks)
        shape = tuple(t.info.shape)
        nbytes = _nbytes(gguf, shape, qtype)
        if nbytes is None:
            qtype, nbytes = "F16", _nbytes(gguf, shape, "F16")
        permuted = 0
        if arch.permute_qk and t.name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            permuted = heads if "q_proj" in t.name else kv_heads
        out.tensors[t.name] = GgufTensor(t.name, gguf_name, qtype, shape, int(nbytes or 0), permuted,
                                         plus_one=arch.norms_plus_one and t.name.endswith("norm.weight"),
                                         index=stacked[1] if stacked else 0, count=experts if stacked else 1)
    _check_stacks(out)
    return out


def _check_stacks(out: GgufLayout) -> None:
    """Every stack whole: each expert once, all of one shape and type."""
    for gguf_name, parts in out.files().items():
        if parts[0].count > 1 and ([p.index for p in parts] != list(range(parts[0].count)) or
                                   len({(p.shape, p.qtype) for p in parts}) > 1):
            raise UnsupportedError(f"GGUF: the experts of {gguf_name} are not {parts[0].count} tensors of one shape "
                                   f"numbered 0 to {parts[0].count - 1} in the checkpoint")


def _qtype(gguf: Any, name: str, shape: tuple[int, ...], quantized: str, always_f32: list[Any], arch: Any,
           blocks: int) -> str:
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32"
    for key in always_f32:
        template = gguf.TENSOR_NAMES.get(key, "")
        if any(name == template.format(bid=b) + ".weight" for b in range(blocks)) or name == template + ".weight":
            return "F32"
    return quantized


def _nbytes(gguf: Any, shape: tuple[int, ...], qtype: str) -> int | None:
    """Bytes of a tensor of ``shape`` in ``qtype``; None when its blocks do not divide the rows."""
    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
    if shape[-1] % block:
        return None
    count = 1
    for d in shape:
        count *= d
    return count // block * size
