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
  ``a * half + b`` (a in {0, 1}, b < half = head_dim / 2) goes to ``b * 2 + a`` (k with the KV heads).
Architectures are rows of ``ARCHS``; a base of another ``model_type`` is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
class Arch:
    """One architecture as llama.cpp's converter writes it."""

    name: str  # gguf MODEL_ARCH member
    permute_qk: bool = False  # llama's rotary layout
    llama_hparams: bool = False  # {arch}.vocab_size and rope.dimension_count written (llama's converter)
    norms_plus_one: bool = False  # Gemma: every "*norm.weight" stored as 1 + w
    hparams: str = "text"  # which set of {arch}.* keys the converter writes ("text": its base class's; "gemma")


LLAMA = Arch("LLAMA", permute_qk=True, llama_hparams=True)
ARCHS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": Arch("QWEN2"), "qwen3": Arch("QWEN3"),
         "gemma": Arch("GEMMA", norms_plus_one=True, hparams="gemma")}


@dataclass
class GgufTensor:
    name: str  # in the checkpoint
    gguf_name: str
    qtype: str  # GGMLQuantizationType member
    shape: tuple[int, ...]  # as in the checkpoint (rows first)
    nbytes: int
    heads: int = 0  # > 0: rows permuted in groups of shape[0] // heads
    plus_one: bool = False  # stored as 1 + w (Gemma's norms)
    offset: int = 0  # in the data section


@dataclass
class GgufLayout:
    arch: Arch
    arch_name: str  # gguf's architecture string
    file_type: str
    tensors: dict[str, GgufTensor] = field(default_factory=dict)  # by checkpoint name, in file order


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
    for t in plan.tensors():
        gguf_name = names.get_name(t.name, try_suffixes=(".weight", ".bias"))
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
                                         plus_one=arch.norms_plus_one and t.name.endswith("norm.weight"))
    return out


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
