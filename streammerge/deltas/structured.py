"""LoRA-like products with structure of their own (row-local, s = adapter weight * the module's scaling):
- ``delora``:   W[rows] += s * B[rows] @ (normalised, lambda-bounded A) * w_norm
- ``hira``:     W[rows] += s * W[rows] * (B[rows] @ A)   (Hadamard with W itself)
- ``beft``:     bias += s * beft_bias
- ``randlora``: W[rows] += s * L[rows] @ R, PEFT's scaled random bases (see ``randlora_factors``)
- ``gralora``:  W[rows] += s * L[rows] @ R[output block]: a k x k grid of low-rank blocks (``GraLoRA``)
- ``vblora``:   W[rows] += s * B[rows] @ A, A and B mixed from a shared vector bank (``VBLoRA``)
- ``unilora``:  W[rows] += s * B[rows] @ A, A and B indexed from one shared vector (``UniLoRA``)
- ``tinylora``: W[rows] += s * B[rows] @ (sum_i v_i P_i) @ A, v the module's shared vector (``TinyLoRA``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .lora import Rows
from .roles import ByRole

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors


@dataclass(frozen=True)
class DeLoRA(ByRole):
    """``W[rows] += s * B[rows] @ (diag(lambda / r / (|A_i| |B^i|)) A) * w_norm``: each rank's pair of
    factors normalised (norms clamped at 1e-4, as PEFT does), bounded by lambda, scaled per input
    column by the saved norms of W (``delora_w_norm``); all of it folded into A at load."""

    roles = ("A", "B", "lambda", "w_norm")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        a, b, lam, norm = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        if len(info.shape) != 2 or [b[0], a[1]] != list(info.shape) or b[1] != a[0] or norm != (a[1],) or lam != (1,):
            return f"{d.lora.module}: DeLoRA A {list(a)}, B {list(b)}, w_norm {list(norm)} do not make {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Rows:
        a, b, lam, norm = (factors.get(d.adapter, k).double() for k in self.factor_keys(d))
        diag = lam / d.lora.r / (a.norm(dim=1).clamp(min=1e-4) * b.norm(dim=0).clamp(min=1e-4))  # (r,)
        return Rows((diag[:, None] * a * norm[None, :]).float(), b.float(), d.scale)


class Hadamard1:
    """``W[rows] += s * W[rows] * (B[rows] @ A)``: the low-rank product scales W element by element."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.a, self.b, self.scale = a, b, scale

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        work.addcmul_(work, self.b[row0 : row0 + rows] @ self.a, value=self.scale)


@dataclass(frozen=True)
class HiRA(ByRole):
    """HiRA (PEFT's merge: ``W + W * (B @ A)``, W as it stands at this delta's turn)."""

    roles = ("A", "B")
    block_buffers = 1

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        a, b = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        if len(info.shape) != 2 or [b[0], a[1]] != list(info.shape) or b[1] != a[0]:
            return f"{d.lora.module}: HiRA B @ A {[b[0], a[1]]} does not fit {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Hadamard1:
        a, b = (factors.get(d.adapter, k) for k in self.factor_keys(d))
        return Hadamard1(a, b, d.scale)


class AddRow:
    """``bias += s * v``: the bias viewed as one row."""

    def __init__(self, v: torch.Tensor, scale: float) -> None:
        self.v, self.scale = v, scale

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        work.add_(self.v.view(1, -1), alpha=self.scale)


@dataclass(frozen=True)
class BEFT_(ByRole):
    """BEFT: a trained bias offset, ``bias += s * beft_bias`` (PEFT: ``bias + beft_bias.squeeze()``)."""

    roles = ("bias",)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        n = d.adapter.tensors[d.lora.key("bias")].numel
        return None if info.shape == (n,) else f"{d.lora.module}: beft_bias has {n} entries but {tensor} is {list(info.shape)}"

    def load(self, d: Delta, factors: Factors) -> AddRow:
        return AddRow(factors.get(d.adapter, d.lora.key("bias")).reshape(-1), d.scale)


def randlora_factors(d: Delta, lam: Any, gamma: Any, a: Any, b: Any) -> tuple[Any, Any]:
    """RandLoRA's delta as L @ R, exactly as PEFT's ``get_scaled_bases`` orders it: the scaled unique
    base on the layer's smaller side, (r * bases, min) from ``lambda[:, :, None] * A * gamma``, the
    shared B on the larger, (max, bases * r); the two flattenings pair as PEFT pairs them."""
    out, cols = d.shape
    small, large, bases = min(out, cols), max(out, cols), gamma.shape[0]
    scaled = (lam[:, :, None] * a[:, :bases, :small] * gamma[None]).flatten(end_dim=1)  # (r * bases, small)
    shared = b[:large, :bases, :].flatten(start_dim=1)  # (large, bases * r)
    if small == cols:
        return shared, scaled  # (out, k) @ (k, in)
    return scaled.T, shared.T


@dataclass(frozen=True)
class RandLoRA(ByRole):
    """RandLoRA: ``W[rows] += s * L[rows] @ R`` with L, R from ``randlora_factors`` (s: randlora_alpha / r)."""

    roles = ("lambda", "gamma", "A", "B")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        lam, gamma, a, b = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        small, large = (min(info.shape), max(info.shape)) if len(info.shape) == 2 else (0, 0)
        if (not small or len(a) != 3 or len(b) != 3 or gamma != (lam[1], small) or a[2] < small or b[0] < large
                or b[1] < lam[1] or b[2] != lam[0] or a[0] != lam[0]):
            return f"{d.lora.module}: RandLoRA lambda {list(lam)}, gamma {list(gamma)} do not fit {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Rows:
        lam, gamma, a, b = (factors.get(d.adapter, k).double() for k in self.factor_keys(d))
        left, right = randlora_factors(d, lam, gamma, a, b)
        return Rows(right.float().contiguous(), left.float().contiguous(), d.scale)


class BlockRows:
    """``W[rows] += s * L[rows] @ R[block of the row]`` (+ a plain LoRA, GraLoRA's hybrid part)."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, scale: float, extra: Rows | None) -> None:
        self.left, self.right, self.scale, self.extra = left, right, scale, extra  # (out, r), (k, r, in)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        per_block = self.left.shape[0] // self.right.shape[0]
        for k in range(row0 // per_block, (row0 + rows - 1) // per_block + 1):
            lo, hi = max(row0, k * per_block), min(row0 + rows, (k + 1) * per_block)
            work[lo - row0 : hi - row0].addmm_(self.left[lo:hi], self.right[k], alpha=self.scale)
        if self.extra is not None:
            self.extra.apply(work, row0, rows)


@dataclass(frozen=True)
class GraLoRA(ByRole):
    """GraLoRA: W split in a k x k grid of blocks, block (i, j) gaining ``B[i, j*sub:(j+1)*sub].T @
    A[j, :, i*sub:(i+1)*sub].T`` (sub = r / k), i.e. per output block i a LoRA of rank r whose A is
    block-sparse; plus, with hybrid_r, a plain LoRA (``gralora_A_general`` / ``_B_general``).
    s = alpha / (r + hybrid_r)."""

    roles = ("A", "B", "A_general", "B_general")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        a, b = d.adapter.tensors[d.lora.key("A")].shape, d.adapter.tensors[d.lora.key("B")].shape
        k = a[0] if len(a) == 3 else 0
        if (len(info.shape) != 2 or not k or len(b) != 3 or b[0] != k or a[2] != b[1] or a[2] % k
                or [k * b[2], k * a[1]] != list(info.shape)):
            return f"{d.lora.module}: GraLoRA A {list(a)}, B {list(b)} do not make {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> BlockRows:
        import torch

        a, b = factors.get(d.adapter, d.lora.key("A")), factors.get(d.adapter, d.lora.key("B"))
        k, part, r = a.shape  # (k, in/k, r)
        sub = r // k
        left = b.permute(0, 2, 1).reshape(-1, r)  # (out, r): row i*(out/k) + o' is B[i, :, o']
        right = torch.zeros(k, r, k * part, dtype=a.dtype, device=a.device)
        for i in range(k):
            for j in range(k):
                right[i, j * sub : (j + 1) * sub, j * part : (j + 1) * part] = a[j, :, i * sub : (i + 1) * sub].t()
        extra = (Rows(factors.get(d.adapter, d.lora.key("A_general")), factors.get(d.adapter, d.lora.key("B_general")),
                      d.scale) if d.lora.has("A_general") else None)
        return BlockRows(left, right, d.scale, extra)


def vb_mix(d: Delta, factors: Factors, side: str) -> torch.Tensor:
    """VB-LoRA's low-rank rows for one side: each the top-k bank vectors, weighted (softmax of the top-k
    logits, or the k - 1 weights saved by save_only_topk_weights plus 1 minus their sum), summed."""
    import torch

    bank = factors.get(d.adapter, d.lora.key("bank")).double()  # (vectors, length)
    if d.lora.has(f"logits_{side}"):
        top = factors.get(d.adapter, d.lora.key(f"logits_{side}")).double().topk(int(d.adapter.config["topk"]), dim=-1)
        weights, indices = top.values.softmax(dim=-1), top.indices
    else:
        indices = factors.get(d.adapter, d.lora.key(f"{side}_idx")).long()
        saved = factors.get(d.adapter, d.lora.key(f"{side}_w")).double()
        weights = torch.cat([saved, 1 - saved.sum(-1, keepdim=True)], dim=-1)
    return (weights[..., None] * bank[indices]).sum(-2)  # (..., length)


@dataclass(frozen=True)
class VBLoRA(ByRole):
    """VB-LoRA: A (r, in) and B (out, r) mixed from a shared vector bank (``vb_mix``): logits_A
    (r, in / length, vectors) give A's rows tile by tile, logits_B (out / length, r, vectors) B's
    columns; then a LoRA product (no scaling)."""


    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        t = d.adapter.tensors
        bank = t[d.lora.key("bank")].shape
        a = t[d.lora.key("logits_A" if d.lora.has("logits_A") else "A_idx")].shape
        b = t[d.lora.key("logits_B" if d.lora.has("logits_B") else "B_idx")].shape
        if len(info.shape) != 2 or len(bank) != 2 or [b[0] * bank[1], a[1] * bank[1]] != list(info.shape) or a[0] != b[1]:
            return f"{d.lora.module}: VB-LoRA logits {list(a)}, {list(b)} with a bank {list(bank)} do not make {tensor}"
        return None

    def load(self, d: Delta, factors: Factors) -> Rows:
        a = vb_mix(d, factors, "A")  # (r, in_tiles, length)
        b = vb_mix(d, factors, "B")  # (out_tiles, r, length)
        a = a.reshape(a.shape[0], -1)
        b = b.transpose(1, 2).reshape(-1, b.shape[1])
        return Rows(a.float(), b.float(), d.scale)


@dataclass(frozen=True)
class UniLoRA(ByRole):
    """UniLoRA: A = theta[indices_A] * scales_A (r, in) and B = theta[indices_B] * scales_B (out, r), one
    shared vector theta indexed per layer (the saved index maps, read exactly as integers); W + B A."""

    roles = ("theta", "idx_A", "idx_B", "scales_A", "scales_B")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        _, ia, ib, sa, sb = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        if len(info.shape) != 2 or ia != sa or ib != sb or len(ia) != 2 or [ib[0], ia[1]] != list(info.shape) or ib[1] != ia[0]:
            return f"{d.lora.module}: UniLoRA index maps {list(ia)}, {list(ib)} do not make {tensor} {list(info.shape)}"
        return None

    def load(self, d: Delta, factors: Factors) -> Rows:
        theta = factors.get(d.adapter, d.lora.key("theta"))
        ia, ib = (factors.put(d.adapter.load_raw(d.lora.key(r)).long()) for r in ("idx_A", "idx_B"))
        a = theta[ia] * factors.get(d.adapter, d.lora.key("scales_A"))
        b = theta[ib] * factors.get(d.adapter, d.lora.key("scales_B"))
        return Rows(a, b, d.scale)


DELORA, HIRA, BEFT, RANDLORA, GRALORA, VBLORA = DeLoRA(), HiRA(), BEFT_(), RandLoRA(), GraLoRA(), VBLoRA()
UNILORA = UniLoRA()


@dataclass(frozen=True)
class TinyLoRA(ByRole):
    """B (out, r) and A (r, in) from the base's SVD, R = sum_i v_i P_i (r x r): folded into A at load."""

    roles = ("A", "B", "P", "v")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        a, b, p, v = (d.adapter.tensors[k].shape for k in self.factor_keys(d))
        if len(info.shape) != 2 or [b[0], a[1]] != list(info.shape) or p != (v[0], a[0], a[0]) or b[1] != a[0]:
            return (f"{d.lora.module}: TinyLoRA B {list(b)} @ (v {list(v)} . P {list(p)}) @ A {list(a)} does not make "
                    f"{tensor} {list(info.shape)}")
        return None

    def load(self, d: Delta, factors: Factors) -> Rows:
        import torch

        a, b, p, v = (factors.get(d.adapter, k) for k in self.factor_keys(d))
        return Rows(torch.einsum("i,ijk->jk", v, p) @ a, b, d.scale)


TINYLORA = TinyLoRA()
