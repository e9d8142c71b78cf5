"""AWQ checkpoints (AutoAWQ's GEMM kernel layout, as transformers saves them:
``quantization_config.quant_method: "awq"``, ``version: "gemm"``), 4-bit, read and dequantized.

Per linear layer ``X``: ``X.qweight`` int32 (K, N/8), the codes of W transposed packed along the
outputs in AWQ's interleaved order (word (k, m) holds W[8m + AWQ_ORDER[j], k] in bits 4j, with
AWQ_ORDER = 0 2 4 6 1 3 5 7); ``X.qzeros`` int32 (G, N/8) in the same order; ``X.scales`` (G, N):

    W[n, k] = (q[n, k] - z[k // group_size, n]) * s[k // group_size, n]

(``zero_point: false``: z = 8). The GEMV, Marlin and exllama versions are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from ..plan.types import Quant
from .gptq import _group_size, groups, int4_weights

if TYPE_CHECKING:
    import torch

    from ..formats.checkpoint import BaseCheckpoint
    from .intgroup import IntCodec


@dataclass(frozen=True)
class Awq:
    name: str = "awq"

    def out_dtype(self, qconfig: dict[str, Any]) -> str | None:
        return None

    def quantized(self, base: BaseCheckpoint, qconfig: dict[str, Any]) -> dict[str, Quant]:
        version = str(qconfig.get("version", "gemm")).lower()
        if qconfig.get("bits", 4) != 4 or version != "gemm":
            raise UnsupportedError(f"base {base.root}: AWQ {qconfig.get('bits', 4)}-bit version {version!r} is not read "
                                   "by this version (4-bit gemm is)")
        return int4_weights(base, self.name, "awq", (4, _group_size(qconfig), 0),
                            read_zeros=qconfig.get("zero_point", True) is not False)

    def codec(self, quant: Quant, side: dict[str, torch.Tensor]) -> IntCodec:
        from .intgroup import AwqCodec

        return AwqCodec(4, groups(quant, side))


SCHEME = Awq()
