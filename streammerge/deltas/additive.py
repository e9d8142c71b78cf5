"""Additive, row-local methods other than LoRA (a chunk of W's rows needs the same rows of the delta
only), s = adapter weight * the module's scaling:
- ``loha``:    W[rows] += s * (w1a[rows] @ w1b) * (w2a[rows] @ w2b)   # two (rows, r) @ (r, in), Hadamard
- ``lokr``:    W[rows] += s * kron(w1, w2)[rows], w1 (a1, a2) and w2 (b1, b2) (each saved whole or as a
               product of two factors, multiplied once at load): row i is the outer product of
               w1[i // b1] and w2[i % b1], flattened (column j1 * b2 + j2)
- ``vera``:    W[rows] += s * (lambda_b * B[:out])[rows] @ (lambda_d * A[:, :in])  (shared projections)
- ``adalora``: W[rows] += s * B[rows] @ (A * E)   (s: lora_alpha / (init_r + 1e-5), see adapters/methods.py)
- ``shira``:   W[i, j] += s * value for the saved sparse (i, j) of the chunk's rows
- ``supertuning``: the same at flat indices, + alpha / r * B @ A in its LoRA mode
- ``c3a``:     W[i*b + p, j*b + q] += s / in * kernel[i, j, (q - p) mod b]   (block-circulant)
- ``pvera``:   ``vera`` on the means (the first half of lambda_d and A)
LoHa and LoKr make temporaries of a block's size (``block_buffers``), which the working set counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .lora import Rows
from .roles import ByRole

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors


class Hadamard:
    def __init__(self, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float) -> None:
        self.w1a, self.w1b, self.w2a, self.w2b, self.scale = w1a, w1b, w2a, w2b, scale

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        product = self.w1a[row0 : row0 + rows] @ self.w1b  # (rows, r) @ (r, in)
        product.mul_(self.w2a[row0 : row0 + rows] @ self.w2b)
        work.add_(product, alpha=self.scale)


class Kronecker:
    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> None:
        self.w1, self.w2, self.scale = w1, w2, scale  # (a1, a2), (b1, b2)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        import torch

        i = torch.arange(row0, row0 + rows, device=work.device)
        b1 = self.w2.shape[0]
        outer = self.w1[i // b1][:, :, None] * self.w2[i % b1][:, None, :]  # (rows, a2, b2)
        work.add_(outer.view(rows, -1), alpha=self.scale)


def _dims(d: Delta, whole: str, left: str, right: str) -> tuple[int, int]:
    """The (rows, columns) of a factor saved whole (``whole``) or as ``left @ right``."""
    t = d.adapter.tensors
    if d.lora.has(whole):
        shape = t[d.lora.key(whole)].shape
        return (shape[0], shape[1]) if len(shape) == 2 else (-1, -1)
    return t[d.lora.key(left)].shape[0], t[d.lora.key(right)].shape[-1]


@dataclass(frozen=True)
class LoHa(ByRole):
    roles = ("w1a", "w1b", "w2a", "w2b")
    block_buffers = 2

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        shapes = [d.adapter.tensors[k].shape for k in self.factor_keys(d)]
        w1a, w1b, w2a, w2b = shapes
        fits = all(len(s) == 2 for s in shapes) and w1a[1] == w1b[0] and w2a[1] == w2b[0]
        if not fits or [w1a[0], w1b[1]] != [w2a[0], w2b[1]] or list(info.shape) != [w1a[0], w1b[1]]:
            return f"{d.lora.module}: LoHa factors {[list(s) for s in shapes]} do not make {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Hadamard:
        w1a, w1b, w2a, w2b = (factors.get(d.adapter, k) for k in self.factor_keys(d))
        return Hadamard(w1a, w1b, w2a, w2b, d.scale)


@dataclass(frozen=True)
class LoKr(ByRole):
    block_buffers = 1

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        (a1, a2), (b1, b2) = _dims(d, "w1", "w1a", "w1b"), _dims(d, "w2", "w2a", "w2b")
        if min(a1, a2, b1, b2) <= 0 or list(info.shape) != [a1 * b1, a2 * b2]:
            return f"{d.lora.module}: kron([{a1}, {a2}], [{b1}, {b2}]) does not make {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Kronecker:
        def whole(name: str) -> torch.Tensor:
            if d.lora.has(name):
                return factors.get(d.adapter, d.lora.key(name))
            return factors.get(d.adapter, d.lora.key(name + "a")) @ factors.get(d.adapter, d.lora.key(name + "b"))

        return Kronecker(whole("w1"), whole("w2"), d.scale)




@dataclass(frozen=True)
class VeRA(ByRole):
    """``W[rows] += s * (lambda_b * B[:out])[rows] @ (lambda_d * A[:, :in])``, the shared projections
    sliced to the layer (PEFT's ``get_delta_weight``); then a LoRA product. PVeRA (``mean_half``)
    saves a mean and a log-variance for each rank (lambda_d and A of 2r rows): a merge takes the
    means, the first r, as PEFT's merge does."""

    mean_half: bool = False
    roles = ("lambda_b", "lambda_d", "A", "B")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        b, dd, a, bb = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        ranks = a[0] // 2 if self.mean_half and len(a) == 2 else (a[0] if len(a) == 2 else -1)
        if (len(info.shape) != 2 or len(a) != 2 or len(bb) != 2 or b != (info.shape[0],) or dd != (a[0],)
                or bb[1] != ranks or a[1] < info.shape[1] or bb[0] < info.shape[0]):
            return (f"{d.lora.module}: VeRA lambda_b {list(b)}, lambda_d {list(dd)}, vera_A {list(a)}, vera_B {list(bb)} "
                    f"do not make {tensor} {list(info.shape)}")
        return None

    def load(self, d: Delta, factors: Factors) -> Rows:
        lambda_b, lambda_d, a, b = (factors.get(d.adapter, k) for k in self.factor_keys(d))
        if self.mean_half:
            lambda_d, a = lambda_d[: lambda_d.shape[0] // 2], a[: a.shape[0] // 2]
        return SlicedRows(lambda_d[:, None] * a, lambda_b[:, None] * b[: lambda_b.shape[0]], d.scale)


class SlicedRows(Rows):
    """``Rows`` with A wider than the weight (VeRA's shared projection): its first ``in`` columns."""

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        work.addmm_(self.b[row0 : row0 + rows], self.a[:, : work.shape[1]], alpha=self.scale)


@dataclass(frozen=True)
class AdaLoRA(ByRole):
    """``W[rows] += s * B[rows] @ (A * E)``: E (k, 1) scales A's rows once at load; then a LoRA product."""

    roles = ("A", "B", "E")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        a, b = d.adapter.tensors[d.lora.key("A")].shape, d.adapter.tensors[d.lora.key("B")].shape
        if list(info.shape) != [b[0], a[1]]:
            return f"{d.lora.module}: AdaLoRA B (A * E) is {[b[0], a[1]]} but {tensor} is {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Rows:
        a, b, e = (factors.get(d.adapter, k) for k in self.factor_keys(d))
        return Rows(a * e, b, d.scale)


class Sparse:
    """``W[i, j] += s * value`` at saved (row, column) indices, the entries sorted by row once so that a
    chunk takes its own by two binary searches."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, scale: float) -> None:
        order = rows.argsort()
        self.rows, self.cols, self.values = rows[order], cols[order], values[order] * scale

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        import torch

        lo, hi = (int(torch.searchsorted(self.rows, v)) for v in (row0, row0 + rows))
        if hi > lo:
            work.index_put_((self.rows[lo:hi] - row0, self.cols[lo:hi]), self.values[lo:hi], accumulate=True)


class Several:
    """Deltas applied one after the other (a method with two parts: supertuning's sparse values and LoRA)."""

    def __init__(self, parts: list[Sparse | Rows]) -> None:
        self.parts = parts

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        for part in self.parts:
            part.apply(work, row0, rows)


@dataclass(frozen=True)
class Supertuning(ByRole):
    """Supertuning: values scatter-added at flat indices of W (``supertuning_indices``, read exactly as
    integers: a large weight's flat indices pass float32's 2^24), plus, in its LoRA mode, ``alpha / r
    * B @ A`` (``supertuning_lora_A/B``)."""


    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        t = d.adapter.tensors
        flat, values = t[d.lora.key("flat")].shape, t[d.lora.key("values")].shape
        lora_fits = not d.lora.has("A") or [t[d.lora.key("B")].shape[0], t[d.lora.key("A")].shape[1]] == list(info.shape)
        if len(info.shape) != 2 or len(flat) != 1 or flat != values or not lora_fits:
            return f"{d.lora.module}: supertuning indices {list(flat)} / values {list(values)} do not fit {tensor}"
        return None

    def load(self, d: Delta, factors: Factors) -> Several:
        from ..errors import InputError

        cols = d.shape[1]
        flat = factors.put(d.adapter.load_raw(d.lora.key("flat")).long())
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= d.shape[0] * cols):
            raise InputError(f"{d.adapter.weights_path}: {d.lora.key('flat')} holds indices outside {list(d.shape)}")
        parts: list[Sparse | Rows] = [Sparse(flat // cols, flat % cols, factors.get(d.adapter, d.lora.key("values")),
                                             d.adapter.weight)]
        if d.lora.has("A"):
            parts.append(Rows(factors.get(d.adapter, d.lora.key("A")), factors.get(d.adapter, d.lora.key("B")), d.scale))
        return Several(parts)


@dataclass(frozen=True)
class Shira(ByRole):
    """SHiRA: a sparse delta, ``shira_indices`` (2, n) (row; column) and ``shira_weight`` (n,) (PEFT's
    ``sparse_coo_tensor``: repeated indices add up, as ``index_put_(accumulate=True)`` does)."""

    roles = ("indices", "values")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        idx, values = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        if len(info.shape) != 2 or len(idx) != 2 or idx[0] != 2 or values != (idx[1],):
            return f"{d.lora.module}: shira_indices {list(idx)} and shira_weight {list(values)} do not fit {tensor}"
        return None

    def load(self, d: Delta, factors: Factors) -> Sparse:
        from ..errors import InputError

        idx = factors.get(d.adapter, d.lora.key("indices")).long()  # (exact: indices < 2^24)
        values = factors.get(d.adapter, d.lora.key("values"))
        if idx.numel() and (int(idx.min()) < 0 or idx.max() >= 1 << 24):
            raise InputError(f"{d.adapter.weights_path}: {d.lora.key('indices')} holds indices out of range")
        return Sparse(idx[0], idx[1], values, d.scale)


class Circulant:
    """C3A's block-circulant delta: row o = i*b + p holds, in column block j, the kernel w[i, j]
    rolled by p (``W[o, j*b + q] += s * w[i, j, (q - p) mod b]``), over in_features as PEFT scales it."""

    def __init__(self, kernel: torch.Tensor, scale: float) -> None:
        self.kernel, self.scale = kernel, scale  # (out/b, in/b, b)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        import torch

        m, n, b = self.kernel.shape
        o = torch.arange(row0, row0 + rows, device=work.device)
        shift = (torch.arange(b, device=work.device)[None, :] - (o % b)[:, None]) % b  # (rows, b): (q - p) mod b
        rolled = torch.gather(self.kernel[o // b], 2, shift[:, None, :].expand(rows, n, b))  # (rows, in/b, b)
        work.add_(rolled.view(rows, n * b), alpha=self.scale / (n * b))


@dataclass(frozen=True)
class C3A(ByRole):
    roles = ("kernel",)
    block_buffers = 3  # (the rows' kernels, the gather's indices, the rolled rows)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        k = d.adapter.tensors[d.lora.key("kernel")].shape
        if len(info.shape) != 2 or len(k) != 3 or [k[0] * k[2], k[1] * k[2]] != list(info.shape):
            return f"{d.lora.module}: c3a_kernel {list(k)} does not make {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Circulant:
        return Circulant(factors.get(d.adapter, d.lora.key("kernel")), d.scale)


LOHA, LOKR, VERA, PVERA, ADALORA, SHIRA, C3A_ = LoHa(), LoKr(), VeRA(), VeRA(mean_half=True), AdaLoRA(), Shira(), C3A()
SUPERTUNING = Supertuning()
