"""Methods whose delta depends on the weight itself (W as the deltas before them made it): a first
pass over W's rows (``FirstPass``) gathers what they need, then the merge pass applies them.

- ``deft``:   W += s * Q_P[rows] @ (R * scaling - right.T @ W)  (PaRa: without R); the first pass sums
  right.T @ W (r x in) over the rows. Q_P, right: P and relu(P), or qr(P) twice.
- ``peanut``: W += s * B[rows] @ h.T, h = the method's small network (depth encoders and decoders, with
  residuals) on W.T @ A.T (in x r), which the first pass sums over the rows.
- ``frod``:   W = U (S + diag(lambda_l)) V.T, U = W V^-T with each column normalised over every row
  (the first pass sums the squares), S the sparse saved values, V the category's shared basis.
- ``osf``:    W += U_low S_low V_low - (the low part of W's own SVD): the whole tensor is gathered in
  the first pass and decomposed (``held_floats`` counts it; the working set refuses a budget too small).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .roles import ByRole

if TYPE_CHECKING:
    import torch

    from ..formats.header import TensorInfo
    from ..plan.types import Delta
    from . import Factors


def _shape_error(d: Delta, tensor: str, info: TensorInfo, out: int, cols: int) -> str | None:
    if len(info.shape) != 2 or list(info.shape) != [out, cols]:
        return f"{d.lora.module}: {d.method} tensors make a [{out}, {cols}] weight but {tensor} is {list(info.shape)}"
    return None


class _Gathered:
    """A first-pass delta that sums a float64 (k x cols) product of W's rows, then adds rows of a
    low-rank delta ``left[rows] @ right`` built from the sum at ``end``."""

    def __init__(self, left: torch.Tensor, out_rows: torch.Tensor, scale: float) -> None:
        self.left, self.out_rows, self.scale = left, out_rows, scale  # (out, k) both: the sum's weights, the delta's rows
        self.sum: torch.Tensor | None = None
        self.right: torch.Tensor | None = None  # (k, cols) float32, once the first pass is done

    def begin(self, cols: int, device: torch.device) -> None:
        import torch

        self.sum = torch.zeros(self.left.shape[1], cols, dtype=torch.float64, device=device)

    def observe(self, work: torch.Tensor, row0: int) -> None:
        assert self.sum is not None
        self.sum += self.left[row0 : row0 + work.shape[0]].double().t() @ work.double()

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        if self.right is not None:
            work.addmm_(self.out_rows[row0 : row0 + rows], self.right, alpha=self.scale)


class DeftDelta(_Gathered):
    def __init__(self, q: torch.Tensor, right: torch.Tensor, r_scaled: torch.Tensor | None, scale: float) -> None:
        super().__init__(right, q, scale)
        self.r_scaled = r_scaled

    def end(self) -> None:
        assert self.sum is not None
        m = self.sum.float()  # right.T @ W
        self.right = -m if self.r_scaled is None else self.r_scaled - m
        self.sum = None


@dataclass(frozen=True)
class Deft(ByRole):
    roles = ("P", "R")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        p = d.adapter.tensors[d.lora.key("P")].shape
        cols = d.adapter.tensors[d.lora.key("R")].shape[1] if d.lora.has("R") else info.shape[-1]
        return _shape_error(d, tensor, info, p[0], cols)

    def held_floats(self, d: Delta) -> int:
        p = d.adapter.tensors[d.lora.key("P")].shape
        return 2 * p[0] * p[1] + 3 * p[1] * d.shape[-1]  # (Q_P and right; the float64 sum and its result)

    def load(self, d: Delta, factors: Factors) -> DeftDelta:
        import torch

        p = factors.get(d.adapter, d.lora.key("P"))
        # PEFT's projection, in float32 on the CPU (QR's signs are the CPU's LAPACK's, as in PEFT's merge)
        if d.adapter.config.get("decomposition_method", "relu") == "qr":
            q = factors.put(torch.linalg.qr(p.cpu().float())[0])
            right = q
        else:
            q, right = p, torch.relu(p)
        r_scaled = factors.get(d.adapter, d.lora.key("R")) * d.lora.scaling if d.lora.has("R") else None
        return DeftDelta(q, right, r_scaled, d.adapter.weight)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # filled on first use (torch imported late)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' ACT2FN entries PEANuT may name, by the same definitions."""
    import torch
    import torch.nn.functional as F

    if not ACTIVATIONS:
        ACTIVATIONS.update({"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
                            "sigmoid": torch.sigmoid, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                            "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "identity": lambda x: x,
                            "linear": lambda x: x})
    return ACTIVATIONS[name]


ACTIVATION_NAMES = ("relu", "gelu", "silu", "swish", "tanh", "sigmoid", "gelu_new", "gelu_pytorch_tanh", "identity",
                    "linear")


class PeanutDelta(_Gathered):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, layers: list[torch.Tensor], act: str, scale: float) -> None:
        super().__init__(a.t(), b, scale)  # the sum is A @ W = (W.T @ A.T).T, (r, in)
        self.layers, self.act = layers, activation(act)

    def end(self) -> None:
        assert self.sum is not None
        h = self.act(self.sum.float().t())  # (in, r): PEFT's non_linear(W.T @ A.T)
        depth = len(self.layers) // 2
        residuals = []
        for enc in self.layers[:depth]:
            residuals.append(h)
            h = self.act(h @ enc.t())
        for i, dec in enumerate(self.layers[depth:]):
            h = self.act(h @ dec.t()) + residuals[depth - 1 - i]
        self.right, self.sum = h.t().contiguous(), None


@dataclass(frozen=True)
class Peanut(ByRole):
    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        a = d.adapter.tensors[d.lora.key("A")].shape
        return _shape_error(d, tensor, info, a[1], info.shape[-1]) if len(info.shape) == 2 else \
            f"{tensor} is not a 2-D weight"

    def held_floats(self, d: Delta) -> int:
        return 3 * d.lora.r * d.shape[-1]

    def load(self, d: Delta, factors: Factors) -> PeanutDelta:
        a, b = factors.get(d.adapter, d.lora.key("A")), factors.get(d.adapter, d.lora.key("B"))
        depth = sum(1 for role, _ in d.lora.keys if role.startswith("enc"))
        layers = [factors.get(d.adapter, d.lora.key(f"{side}{i}")) for side in ("enc", "dec") for i in range(depth)]
        return PeanutDelta(a, b, layers, str(d.adapter.config.get("act_fn", "relu")), d.scale)


class FrodDelta:
    """``W = (W X.T / lambda0) M``: X = V^-1 (or its pseudo-inverse, as PEFT falls back to), lambda0
    the column norms of W X.T over every row (first pass), M = (S + diag(lambda_l)) V.T."""

    def __init__(self, x_t: torch.Tensor, m: torch.Tensor) -> None:
        self.x_t, self.m = x_t, m  # (in, in) float64, (in, in) float32
        self.sumsq: torch.Tensor | None = None
        self.inv_norm: torch.Tensor | None = None

    def begin(self, cols: int, device: torch.device) -> None:
        import torch

        self.sumsq = torch.zeros(cols, dtype=torch.float64, device=device)

    def observe(self, work: torch.Tensor, row0: int) -> None:
        assert self.sumsq is not None
        self.sumsq += (work.double() @ self.x_t).square().sum(dim=0)

    def end(self) -> None:
        import torch

        assert self.sumsq is not None
        norms = self.sumsq.sqrt()
        self.inv_norm = torch.where(norms > 1e-12, 1 / norms, torch.zeros_like(norms))
        self.sumsq = None

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        if self.inv_norm is not None:
            u = ((work.double() @ self.x_t) * self.inv_norm).float()
            work.copy_(u @ self.m)


@dataclass(frozen=True)
class Frod(ByRole):
    roles = ("lambda_l", "values", "V", "indices", "size")
    block_buffers = 3  # (a block of W X.T in float64, and U)

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        v = d.adapter.tensors[d.lora.key("V")].shape
        return _shape_error(d, tensor, info, info.shape[0] if info.shape else 0, v[0]) or (
            None if len(v) == 2 and v[0] == v[1] else f"{d.lora.module}: FRoD's V is {list(v)}, not square")

    def held_floats(self, d: Delta) -> int:
        n = d.adapter.tensors[d.lora.key("V")].shape[0]
        return 4 * n * n + 3 * n  # (X.T in float64, V, M; the column sums)

    def load(self, d: Delta, factors: Factors) -> FrodDelta:
        import torch

        lam, values, v = (factors.get(d.adapter, d.lora.key(r)) for r in ("lambda_l", "values", "V"))
        indices = d.adapter.load_raw(d.lora.key("indices")).long()
        size = [int(x) for x in d.adapter.load_raw(d.lora.key("size")).tolist()]
        v64 = v.double()
        try:
            x = torch.linalg.solve(v64, torch.eye(v64.shape[0], dtype=torch.float64, device=v64.device))
        except RuntimeError:  # (singular V: PEFT's own fallback)
            x = torch.linalg.pinv(v64, rtol=1e-6)
        s = torch.zeros(size, dtype=torch.float32, device=v.device)
        s.index_put_((indices[0].to(v.device), indices[1].to(v.device)), values, accumulate=True)
        s += torch.diag(lam)
        return FrodDelta(x.t().contiguous(), s @ v.t())


class OsfDelta:
    """The whole of W gathered (float32), then W += U_low S_low V_low - (its SVD's low part)."""

    def __init__(self, current: torch.Tensor, kept: int, scale: float) -> None:
        self.current, self.kept, self.scale = current, kept, scale  # current: (out, in) float32
        self.w: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None

    def begin(self, cols: int, device: torch.device) -> None:
        import torch

        self.w = torch.empty_like(self.current)

    def observe(self, work: torch.Tensor, row0: int) -> None:
        assert self.w is not None
        self.w[row0 : row0 + work.shape[0]].copy_(work)

    def end(self) -> None:
        import torch

        assert self.w is not None
        u, s, vt = torch.linalg.svd(self.w, full_matrices=False)  # float32, as PEFT decomposes it
        self.w = None
        k = self.kept
        initial = (u[:, k:] * s[k:].unsqueeze(0)) @ vt[k:]
        del u, s, vt
        self.delta = self.current.sub_(initial)

    def apply(self, work: torch.Tensor, row0: int, rows: int) -> None:
        if self.delta is not None:
            work.add_(self.delta[row0 : row0 + rows], alpha=self.scale)


@dataclass(frozen=True)
class Osf(ByRole):
    roles = ("U", "S", "V")

    def check(self, d: Delta, tensor: str, info: TensorInfo) -> str | None:
        u, v = (d.adapter.tensors[d.lora.key(r)].shape for r in ("U", "V"))
        return _shape_error(d, tensor, info, u[0], v[1])

    def held_floats(self, d: Delta) -> int:
        out, cols = d.shape
        return 3 * out * cols + 2 * min(out, cols) * (out + cols)  # (current, W, initial; U and Vt, LAPACK's work)

    def load(self, d: Delta, factors: Factors) -> OsfDelta:
        u, s, v = (factors.get(d.adapter, d.lora.key(r)) for r in ("U", "S", "V"))
        kept = min(u.shape[0], v.shape[1]) - u.shape[1]
        return OsfDelta((u * s.unsqueeze(0)) @ v, kept, d.scale)


DEFT, PEANUT, FROD, OSF = Deft(), Peanut(), Frod(), Osf()
