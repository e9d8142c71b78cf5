"""Codecs: stored bytes <-> float32 rows, one module per storage scheme, chosen by a table.

A codec answers: how to view raw bytes of whole rows (``rows``), how to widen them to float32
(``decode``) and round float32 back (``encode``, once), how many bytes elements take (``nbytes``)
and the row alignment a chunk must respect; a quantized scheme (``Scheme``) finds its weights' side
tensors (scales, absmax ...) from the headers and builds their codec. Registered by
the tensor's dtype (plain floats) and, for quantized checkpoints, by the config's
``quantization_config.quant_method`` (``QUANT_METHODS``); a scheme not listed is refused by name
(``check_scheme``) with what is supported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import UnsupportedError
from ..formats.header import FLOAT_DTYPES

if TYPE_CHECKING:
    import torch

    from ..formats.checkpoint import BaseCheckpoint
    from ..plan.types import Quant, Source


class Codec(Protocol):
    @property
    def dtype(self) -> str: ...

    @property
    def row_alignment(self) -> int: ...

    @property
    def itemsize(self) -> int:
        """Bytes an element takes at most (for the working set)."""
        ...

    def nbytes(self, elements: int) -> int:
        """Stored bytes of ``elements`` consecutive elements (whole rows: sub-byte schemes pack them)."""
        ...

    def spans(self, row0: int, rows: int, cols: int) -> list[tuple[int, int]]:
        """Where the stored bytes of rows ``[row0, row0 + rows)`` lie in the tensor's data: (offset,
        length) ranges, read one after another into one buffer (one range unless stored by column)."""
        ...

    def rows(self, raw: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """The raw bytes of ``spans`` as the stored tensor view ``block`` and ``decode`` take."""
        ...

    def block(self, stored: torch.Tensor, b0: int, k: int) -> torch.Tensor:
        """Rows ``[b0, b0 + k)`` of a chunk's ``rows`` view (``b0`` and ``k``: multiples of the alignment)."""
        ...

    def decode(self, stored: torch.Tensor, work: torch.Tensor, row0: int) -> None:
        """Rows ``[row0, row0 + len(stored))`` of the tensor, widened into the float32 ``work``."""
        ...

    def encode(self, work: torch.Tensor, out: torch.Tensor) -> None: ...


@runtime_checkable
class Requantizer(Protocol):
    """An output codec that re-quantizes (``fp8_out``): it sees W0 through ``snapshot`` (placed before
    the deltas), and once every row is encoded gives the new scales and how much delta survived."""

    snapshot: Any

    def scale_bytes(self) -> memoryview: ...

    @property
    def survives(self) -> float | None: ...


class RowMajor:
    """What codecs whose rows are stored one after another share: one byte range per chunk, and
    blocks that are rows of the stored view."""

    def nbytes(self, elements: int) -> int:
        raise NotImplementedError

    def spans(self, row0: int, rows: int, cols: int) -> list[tuple[int, int]]:
        return [(self.nbytes(row0 * cols), self.nbytes(rows * cols))]

    def block(self, stored: torch.Tensor, b0: int, k: int) -> torch.Tensor:
        return stored[b0 : b0 + k]


def codec_for(dtype: str) -> Codec:
    """The codec of a stored dtype (a quantized scheme would be looked up by quant_method first)."""
    from .plain import PlainCodec

    if dtype not in FLOAT_DTYPES:
        raise KeyError(dtype)
    return PlainCodec(dtype)


class Scheme(Protocol):
    """A quantized storage scheme: which tensors it holds (from headers) and their codec."""

    name: str

    def out_dtype(self, qconfig: dict[str, Any]) -> str | None:
        """What dequantized weights become by default (None: the dtype of the unquantized tensors)."""
        ...

    def quantized(self, base: BaseCheckpoint, qconfig: dict[str, Any]) -> dict[str, Quant]: ...

    def codec(self, quant: Quant, side: dict[str, torch.Tensor]) -> Codec: ...


QUANTIZATION_KEYS = ("quantization_config", "compression_config")  # removed from a dequantized output's config

# quantization_config.quant_method -> the module of its scheme, imported when a checkpoint uses it.
QUANT_METHODS: dict[str, str] = {"fp8": "fp8_block", "compressed-tensors": "compressed_tensors",
                                 "bitsandbytes": "bnb4", "gptq": "gptq", "awq": "awq"}


def quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's quantization config (top level or text_config), if any."""
    text = config.get("text_config")
    for cfg in (config, text if isinstance(text, dict) else {}):
        q = next((cfg[k] for k in QUANTIZATION_KEYS if isinstance(cfg.get(k), dict)), None)
        if isinstance(q, dict):
            return q
    return None


def check_scheme(config: dict[str, Any], where: str) -> Scheme | None:
    """The scheme of a quantized checkpoint (None: not quantized); refused by name when no codec reads it."""
    q = quantization(config)
    if q is None:
        return None
    method = q.get("quant_method", "unknown")
    if method not in QUANT_METHODS:
        supported = ", ".join(sorted(QUANT_METHODS)) or "none yet"
        raise UnsupportedError(f"base {where} is quantized (quantization_config.quant_method {method!r}); "
                               f"quantized schemes this version reads: {supported}; point --base at the 16-bit "
                               "checkpoint the adapter was trained against")
    return scheme(method)


def side_source(base: BaseCheckpoint, name: str, scheme_name: str) -> Source:
    """Where a quantized weight's side tensor (or packed codes) lies in a local base shard."""
    from ..plan.types import Source

    header = base.shards[base.weight_map[name]]
    if header.data_start < 0:  # a Hub shard not downloaded yet: its data offset is unknown
        raise UnsupportedError(f"base {base.root}: a {scheme_name} base from the Hub shard by shard is not supported "
                               "by this version; download the repository first and pass its directory")
    return Source(header.path, header.data_start, header.tensors[name])


def scheme(method: str) -> Scheme:
    found: Scheme = importlib.import_module(f"{__package__}.{QUANT_METHODS[method]}").SCHEME
    return found
