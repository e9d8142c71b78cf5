"""Codecs: stored bytes <-> float32 rows, one module per storage scheme, chosen by a table.

A codec answers: how to view raw bytes of whole rows (``rows``), how to widen them to float32
(``decode``) and round float32 back (``encode``, once), which side tensors it needs
(``side_tensors``: scales, absmax ...) and the row alignment a chunk must respect. Registered by
the tensor's dtype (plain floats) and, for quantized checkpoints, by the config's
``quantization_config.quant_method``. Only plain dtypes exist so far: a quantized base is refused
by the plan with what is supported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..formats.header import FLOAT_DTYPES

if TYPE_CHECKING:
    import torch


class Codec(Protocol):
    dtype: str
    row_alignment: int

    @property
    def itemsize(self) -> int: ...

    def side_tensors(self, tensor: str) -> tuple[str, ...]: ...

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor: ...

    def decode(self, stored: torch.Tensor, work: torch.Tensor) -> None: ...

    def encode(self, work: torch.Tensor, out: torch.Tensor) -> None: ...


def codec_for(dtype: str) -> Codec:
    """The codec of a stored dtype (a quantized scheme would be looked up by quant_method first)."""
    from .plain import PlainCodec

    if dtype not in FLOAT_DTYPES:
        raise KeyError(dtype)
    return PlainCodec(dtype)
