"""GPTQ checkpoints (AutoGPTQ / GPTQModel, as transformers saves them: ``quantization_config.quant_method:
"gptq"``), 4-bit, read and dequantized to 16-bit.

Per linear layer ``X``: ``X.qweight`` int32 (K/8, N), the codes of W transposed packed down the
input dimension (word (p, n) holds W[n, 8p + j] in bits 4j); ``X.scales`` (G, N) float16;
``X.qzeros`` int32 (G, N/8), zero points packed along the outputs (element j in bits 4j);
``X.g_idx`` int32 (K,), each input column's group (act-order, ``desc_act``, permutes it; without it
g_idx[k] = k // group_size). Then

    W[n, k] = (q[n, k] - z[g_idx[k], n]) * s[g_idx[k], n]

with z = qzeros + 1 in the original format (``checkpoint_format: "gptq"``: AutoGPTQ saves zero - 1)
and z = qzeros in GPTQModel's ``gptq_v2``. ``X.bias`` and unquantized tensors stay as they are.
Other bit widths, the marlin/bitblas/exllama repackings and GPTQ's checkpoint formats other than
these two are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError, UnsupportedError
from ..plan.types import Quant
from . import side_source

if TYPE_CHECKING:
    import torch

    from ..formats.checkpoint import BaseCheckpoint
    from .intgroup import IntCodec

ZERO_ADDED = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what the saved zero points lack


def int4_weights(base: BaseCheckpoint, scheme: str, layout: str, params: tuple[Any, ...], *,
                 read_zeros: bool = True) -> dict[str, Quant]:
    """Every ``X.qweight`` with its ``X.scales``, ``X.qzeros`` (not read when ``read_zeros`` is off: then
    z = 8) and ``X.g_idx`` (GPTQ and AWQ name them alike; ``layout`` says how the words hold the
    codes), shapes checked: keyed by ``X.weight``."""
    found: dict[str, Quant] = {}
    for name in [n for n in base.weight_map if n.endswith(".qweight")]:
        module = name.removesuffix(".qweight")
        words, scales = base.info(name), base.info(module + ".scales") if module + ".scales" in base.weight_map else None
        if scales is None or len(words.shape) != 2 or words.dtype != "I32" or len(scales.shape) != 2:
            raise InputError(f"base {base.root}: {name} {words.dtype}{list(words.shape)} needs an int32 2-D qweight and "
                             f"a 2-D {module}.scales; the checkpoint is incomplete or not {scheme}")
        n = scales.shape[1]
        k = words.shape[0] * 8 if layout == "gptq" else words.shape[0]
        zeros = base.info(module + ".qzeros") if module + ".qzeros" in base.weight_map else None
        packed = (k // 8, n) if layout == "gptq" else (k, n // 8)
        if tuple(words.shape) != packed or n % 8 or (zeros is not None and tuple(zeros.shape) != (scales.shape[0], n // 8)):
            raise InputError(f"base {base.root}: {name} {list(words.shape)}, {module}.scales {list(scales.shape)} and "
                             f"qzeros {list(zeros.shape) if zeros else None} do not fit one 4-bit [{n}, {k}] weight")
        side = {key: side_source(base, f"{module}.{stored}", scheme) for key, stored in
                (("scale", "scales"), ("zero", "qzeros"), ("g_idx", "g_idx")) if f"{module}.{stored}" in base.weight_map}
        unread: tuple[str, ...] = ()
        if not read_zeros and side.pop("zero", None) is not None:
            unread = (module + ".qzeros",)
        floats = scales.numel * (2 if "zero" in side else 1) + (2 * k if "g_idx" in side else 0)
        found[module + ".weight"] = Quant(scheme, side, params, unread, (n, k), layout, name, floats,
                                          8 if layout == "awq" else 1)
    return found


@dataclass(frozen=True)
class Gptq:
    name: str = "gptq"

    def out_dtype(self, qconfig: dict[str, Any]) -> str | None:
        return None  # the dtype of the unquantized tensors (float16, as GPTQ runs)

    def quantized(self, base: BaseCheckpoint, qconfig: dict[str, Any]) -> dict[str, Quant]:
        fmt = str(qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq")
        if qconfig.get("bits") != 4 or fmt not in ZERO_ADDED:
            raise UnsupportedError(f"base {base.root}: GPTQ {qconfig.get('bits')}-bit, checkpoint format {fmt!r}, is not "
                                   f"read by this version (4-bit {' and '.join(ZERO_ADDED)} are)")
        return int4_weights(base, self.name, "gptq", (4, _group_size(qconfig), ZERO_ADDED[fmt]))

    def codec(self, quant: Quant, side: dict[str, torch.Tensor]) -> IntCodec:
        from .intgroup import GptqCodec

        return GptqCodec(4, groups(quant, side))


def _group_size(qconfig: dict[str, Any]) -> int:
    size = qconfig.get("group_size", 128)
    return int(size) if isinstance(size, int) and size > 0 else 0  # -1: one group over all columns


def groups(quant: Quant, side: dict[str, torch.Tensor]) -> Any:
    """The codec's (N, G) scales and zero points, and act-order's groups, from GPTQ/AWQ side tensors."""
    from .intgroup import AWQ_ORDER, SEQUENTIAL, Groups, unpack

    import torch

    bits, size, zero_added = quant.params
    n, k = quant.shape or (0, 0)
    scale = side["scale"].float().T.contiguous()  # (G, N) -> (N, G)
    order = AWQ_ORDER if quant.layout == "awq" else SEQUENTIAL
    zero: torch.Tensor | float = ((unpack(side["zero"], bits, order).float() + zero_added).T.contiguous()
                                  if "zero" in side else float(1 << (bits - 1)))
    g_idx = side["g_idx"].long() if "g_idx" in side else None
    size = size or k
    if g_idx is not None and torch.equal(g_idx, torch.arange(k, device=g_idx.device) // size):
        g_idx = None  # no act-order: whole groups in order
    return Groups(scale, zero, size, g_idx)


SCHEME = Gptq()
