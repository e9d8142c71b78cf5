"""FourierFT and WaveFT, spectra at n locations drawn by ``torch.randperm(out * in)`` from the saved seed.

FourierFT: ``W += s * scaling * Re(ifft2(F))``, F zero but for the saved spectrum at n locations
drawn by ``torch.randperm(out * in)`` from the saved seed (``locations.py``). Row-local: element
(r, c) of Re(ifft2(F)) is ``sum_k f_k cos(2 pi (u_k r / out + v_k c / in)) / (out in)``, so a block of
rows is ``(cos(R) f) @ cos(C) - (sin(R) f) @ sin(C)``: the column tables (n x in) are built once per
tensor (``held_floats``), the row tables per block, in pieces of at most ``in`` frequencies (three
floats of temporaries per element of a block). Angles are reduced exactly in integers (u r mod out) before the
float64 cos / sin, then float32 (PEFT's ifft2 runs in float32 too).

WaveFT: ``W += s * scaling * idwt2(F)`` (or ``s * scaling * F`` without the inverse transform). The
one-level inverse transform of F (padded, cut into its four quadrants LL, LH, HL, HH) puts each entry
f at (i, j) of its quadrant into the L x L block at (2i, 2j) of the output as f * outer(row filter,
column filter): LL (lo, lo), LH (hi, lo), HL (lo, hi), HH (hi, hi), L the filters' length (Haar, db1,
PEFT's default: lo = (1, 1) / sqrt(2), hi = (1, -1) / sqrt(2)); the result is cropped to the weight.
So the delta is sparse, L^2 entries a coefficient (``additive.Sparse``) (``synthesis_entries``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .additive import Sparse
from .roles import ByRole

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors


BUILD_ELEMENTS = 1 << 18  # float64 angles computed at a time while the column tables are built


def spectrum_locations(d: Delta, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the n spectrum entries of ``d``'s weight, as PEFT draws them."""
    import torch

    from .locations import randperm_prefix

    out, cols = d.shape
    flat = torch.from_numpy(randperm_prefix(out * cols, n, int(d.adapter.config["random_loc_seed"])))
    return flat // cols, flat % cols


def spectrum_fits(d: Delta, tensor: str, info: TensorInfo) -> str | None:
    n = d.adapter.tensors[d.lora.key("spectrum")].numel
    if len(info.shape) != 2 or n > info.numel:
        return f"{d.lora.module}: {d.method}'s {n} spectrum entries do not fit {tensor} {list(info.shape)}"
    return None


def angles(index: torch.Tensor, positions: torch.Tensor, period: int) -> torch.Tensor:
    """2 pi (index * position mod period) / period, (len(positions), len(index)) float64 (the products,
    below out * in, are exact in float64)."""
    import torch

    return torch.outer(positions.double(), index.double()).remainder_(period).mul_(2 * math.pi / period)


class FourierDelta:
    def __init__(self, f: torch.Tensor, u: torch.Tensor, cos_c: torch.Tensor, sin_c: torch.Tensor, out: int,
                 scale: float) -> None:
        self.f, self.u, self.cos_c, self.sin_c, self.out, self.scale = f, u, cos_c, sin_c, out, scale

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        import torch

        positions = torch.arange(row0, row0 + rows, device=work.device)
        step = max(1, work.shape[1])
        for k0 in range(0, self.f.shape[0], step):  # (rows x piece <= a block: float64 angles, float32 terms)
            u, f = self.u[k0 : k0 + step], self.f[k0 : k0 + step]
            work.addmm_(angles(u, positions, self.out).cos_().float().mul_(f), self.cos_c[k0 : k0 + step],
                        alpha=self.scale)
            work.addmm_(angles(u, positions, self.out).sin_().float().mul_(f), self.sin_c[k0 : k0 + step],
                        alpha=-self.scale)


@dataclass(frozen=True)
class FourierFT(ByRole):
    roles = ("spectrum",)
    block_buffers = 3

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        return spectrum_fits(d, tensor, info)

    def held_floats(self, d: Delta) -> int:
        return 2 * d.lora.r * d.shape[1] + 2 * BUILD_ELEMENTS  # (the float32 column tables; float64 angles)

    def load(self, d: Delta, factors: Factors) -> FourierDelta:
        import torch

        f = factors.get(d.adapter, d.lora.key("spectrum"))
        out, cols = d.shape
        u, v = (factors.put(x) for x in spectrum_locations(d, f.shape[0]))
        positions = torch.arange(cols, device=f.device)
        cos_c, sin_c = (torch.empty(f.shape[0], cols, dtype=torch.float32, device=f.device) for _ in range(2))
        step = max(1, BUILD_ELEMENTS // cols)
        for k0 in range(0, f.shape[0], step):  # (float64 angles a piece of frequencies at a time)
            cos_c[k0 : k0 + step] = angles(v[k0 : k0 + step], positions, cols).t().cos_()
            sin_c[k0 : k0 + step] = angles(v[k0 : k0 + step], positions, cols).t().sin_()
        return FourierDelta(f, u, cos_c, sin_c, out, d.scale / (out * cols))


HAAR = ([2.0**-0.5, 2.0**-0.5], [2.0**-0.5, -(2.0**-0.5)])  # db1's reconstruction filters (low, high)
# PEFT's own filter tables differ from PyWavelets' here (coif4's values, coif5's length): not merged
FILTERS_NOT_PYWT = ("coif4", "coif5")


def wavelet_filters(family: str) -> tuple[list[float], list[float]]:
    """The reconstruction filters (low, high) of a wavelet family: Haar built in, the others from
    PyWavelets (the optional extra ``streammerge[wavelets]``), whose taps equal PEFT's table for
    db1-db10, sym2-sym10 and coif1-coif3 (checked in the tests)."""
    if family in ("db1", "haar"):
        return HAAR
    import pywt  # (checked importable at plan time)

    w = pywt.Wavelet(family)
    return list(w.rec_lo), list(w.rec_hi)


def synthesis_grid(u: torch.Tensor, v: torch.Tensor, out: int, cols: int, taps: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Where PEFT's synthesis puts each spectrum entry at (u, v): its quadrant position (i, j), whether
    its quadrant is a right one (rows high-pass) or a lower one (columns high-pass), and the output's
    first row and column in the transposed convolution's frame (``top``, ``left``: the L - 2 cut, then
    the centred crop): the coefficient reaches rows 2i + a - top and columns 2j + b - left."""
    tall, wide = out + taps - 2, cols + taps - 2
    tall, wide = tall + tall % 2, wide + wide % 2
    p, q = u + (tall - out) // 2, v + (wide - cols) // 2
    lower, right = p >= tall // 2, q >= wide // 2
    i, j = p - (tall // 2) * lower, q - (wide // 2) * right
    cut = (2 * taps - 3) // 2
    top = cut + (2 * (tall // 2) - taps + 2 - out) // 2
    left = cut + (2 * (wide // 2) - taps + 2 - cols) // 2
    return i, j, right, lower, top, left


def synthesis_entries(u: torch.Tensor, v: torch.Tensor, f: torch.Tensor, out: int, cols: int,
                      filters: tuple[list[float], list[float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, columns, values) of PEFT's one-level idwt2 of F (zero but for f at (u, v)) cropped to
    out x cols. F is padded by the filter length L - 2 (then to even sides) with the weight centred;
    its quadrants LL, LH (top right: rows high-pass), HL (bottom left: columns high-pass), HH put each
    coefficient at (i, j) into the L x L block at (2i, 2j) as f * outer(row filter, column filter)
    (a transposed convolution of stride 2); L - 2 is cut from each side, the rest cropped to the
    weight, centred."""
    import torch

    lo, hi = (torch.tensor(x, dtype=torch.float64, device=f.device) for x in filters)
    taps = lo.shape[0]
    i, j, right, lower, top, left = synthesis_grid(u, v, out, cols, taps)
    row_filter = torch.where(right[:, None], hi, lo)  # (n, L): the quadrant's filter down the rows
    col_filter = torch.where(lower[:, None], hi, lo)
    rows, columns, values = [], [], []
    for a in range(taps):
        for b in range(taps):
            rows.append(2 * i + a - top)
            columns.append(2 * j + b - left)
            values.append(f * (row_filter[:, a] * col_filter[:, b]).to(f.dtype))
    r, c, x = torch.cat(rows), torch.cat(columns), torch.cat(values)
    keep = (r >= 0) & (r < out) & (c >= 0) & (c < cols)
    return r[keep], c[keep], x[keep]


@dataclass(frozen=True)
class WaveFT(ByRole):
    roles = ("spectrum",)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        return spectrum_fits(d, tensor, info)

    def held_floats(self, d: Delta) -> int:
        taps = 2 if d.adapter.config.get("wavelet_family", "db1") in ("db1", "haar") else 40  # (at most coif's)
        return 5 * taps * taps * d.lora.r  # (L x L output entries a coefficient: rows, columns int64, values)

    def load(self, d: Delta, factors: Factors) -> Sparse:
        f = factors.get(d.adapter, d.lora.key("spectrum"))
        out, cols = d.shape
        u, v = (factors.put(x) for x in spectrum_locations(d, f.shape[0]))
        if d.adapter.config.get("use_idwt", True):
            filters = wavelet_filters(str(d.adapter.config.get("wavelet_family", "db1")))
            return Sparse(*synthesis_entries(u, v, f, out, cols, filters), d.scale)
        return Sparse(u, v, f, d.scale)


FOURIERFT, WAVEFT = FourierFT(), WaveFT()
