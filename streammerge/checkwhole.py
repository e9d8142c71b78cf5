"""verify's float64 reading of the methods whose delta depends on W itself (``deltas/fromweight.py``),
from PEFT's definitions: what they need of every row of W (as the deltas before them made it) is
gathered once per tensor from ``before``, row by row, and kept for the tensor's other sampled rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from .checkrows import Before, Factors64, Row

if TYPE_CHECKING:
    from .plan.types import Delta


def _every_row(d: Delta, before: Before) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    for r in range(d.shape[0]):
        yield r, *before(r)


def _once(f: Factors64, d: Delta, make: Callable[[], Any]) -> Any:
    """What ``make`` gathers for ``d``, computed on the first sampled row only."""
    entry = (id(d), "gathered")
    if entry not in f.gathered:
        f.gathered[entry] = make()
    return f.gathered[entry]


def _deft(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    p = f(d, "P")
    q, right = (torch.linalg.qr(p)[0],) * 2 if d.adapter.config.get("decomposition_method") == "qr" else (p, p.clamp(min=0))

    def gather() -> tuple[torch.Tensor, torch.Tensor]:
        m, mag = torch.zeros(p.shape[1], exact.shape[0], dtype=torch.float64), torch.zeros(p.shape[1], exact.shape[0],
                                                                                            dtype=torch.float64)
        for r, w, w_size in _every_row(d, before):
            m += torch.outer(right[r], w)
            mag += torch.outer(right[r].abs(), w_size)
        return m, mag

    m, mag = _once(f, d, gather)
    injected = f(d, "R") * d.lora.scaling if d.lora.has("R") else torch.zeros_like(m)
    term = d.adapter.weight * (q[row] @ (injected - m))
    bound = abs(d.adapter.weight) * (q[row].abs() @ (injected.abs() + mag))
    return exact + term, size + bound, d.shape[0] + p.shape[1] + 4


def _peanut(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """W + s B h^T, h PEANuT's network on act(W^T A^T); magnitudes through it with each activation's
    slope at most 1.13 (gelu's largest), the sizes for the float32 bound."""
    from .deltas.fromweight import activation

    a, b = f(d, "A"), f(d, "B")
    act = activation(str(d.adapter.config.get("act_fn", "relu")))
    depth = sum(1 for role, _ in d.lora.keys if role.startswith("enc"))

    def gather() -> tuple[torch.Tensor, torch.Tensor]:
        g, mag = torch.zeros(exact.shape[0], a.shape[0], dtype=torch.float64), torch.zeros(exact.shape[0], a.shape[0],
                                                                                            dtype=torch.float64)
        for r, w, w_size in _every_row(d, before):
            g += torch.outer(w, a[:, r])
            mag += torch.outer(w_size, a[:, r].abs())
        h, hm, residuals = act(g), 1.13 * mag, []
        for i in range(depth):
            residuals.append((h, hm))
            enc = f(d, f"enc{i}")
            h, hm = act(h @ enc.T), 1.13 * hm @ enc.abs().T
        for i in range(depth):
            dec, (res, res_m) = f(d, f"dec{i}"), residuals[depth - 1 - i]
            h, hm = act(h @ dec.T) + res, 1.13 * hm @ dec.abs().T + res_m
        return h, hm

    h, hm = _once(f, d, gather)
    return (exact + d.scale * (b[row] @ h.T), size + abs(d.scale) * (b[row].abs() @ hm.T),
            (2 * depth + 2) * (a.shape[0] + 2) + d.shape[0])


def _frod(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """W = U (S + diag(lambda_l)) V^T, U = W V^-T with its columns normalised over every row."""
    v = f(d, "V")

    def gather() -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.zeros(*(int(x) for x in d.adapter.load_raw(d.lora.key("size")).tolist()), dtype=torch.float64)
        idx = d.adapter.load_raw(d.lora.key("indices")).long()
        s.index_put_((idx[0], idx[1]), f(d, "values"), accumulate=True)
        sumsq = torch.zeros(v.shape[0], dtype=torch.float64)
        for _, w, _ in _every_row(d, before):
            sumsq += torch.linalg.solve(v, w).square()  # (row of W V^-T)
        return s + torch.diag(f(d, "lambda_l")), sumsq.sqrt()

    core, norms = _once(f, d, gather)
    u = torch.linalg.solve(v, exact) / norms
    n = v.shape[0]
    return u @ core @ v.T, u.abs() @ core.abs() @ v.abs().T + exact.abs(), 2 * n + 8


def _osf(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """W - (its SVD's low part) + U_low S_low V_low; a float32 SVD reconstructs W to about
    min(out, in) roundings of its largest singular value."""
    trained_u, trained_s, trained_v = f(d, "U"), f(d, "S"), f(d, "V")

    def gather() -> tuple[torch.Tensor, float]:
        w = torch.stack([w for _, w, _ in _every_row(d, before)])
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        k = s.shape[0] - trained_s.shape[0]
        return (u[:, :k] * s[:k]) @ vt[:k], float(s[0])

    kept, sigma = _once(f, d, gather)
    trained = (trained_u[row] * trained_s) @ trained_v
    magnitude = (trained_u[row].abs() * trained_s.abs()) @ trained_v.abs() + sigma + size
    return kept[row] + d.scale * trained + (1 - d.scale) * (exact - kept[row]), magnitude, min(d.shape) + 8


def _glora_path(d: Delta, f: Factors64, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A GLoRA path's value (Xd @ Xu, X) and its terms' magnitude; None for zeros."""
    if d.lora.has(f"{name}_d"):
        xd, xu = f(d, f"{name}_d"), f(d, f"{name}_u")
        return xd @ xu, xd.abs() @ xu.abs()
    if d.lora.has(f"{name}_x"):
        x = f(d, f"{name}_x")
        return x, x.abs()
    return None, None


def _glora(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """W + W * A + B (PEFT's merge), one row: a column path gives the row one number, a scalar all."""
    (a, a_m), (b, b_m) = _glora_path(d, f, "A"), _glora_path(d, f, "B")
    s = d.scale
    pick = (lambda x: x if x.numel() == 1 else x[row])  # noqa: E731
    new, bound = exact.clone(), size.clone()
    if a is not None:
        new, bound = new + s * exact * pick(a).reshape(-1), bound + abs(s) * size * pick(a_m).reshape(-1)
    if b is not None:
        new, bound = new + s * pick(b).reshape(-1), bound + abs(s) * pick(b_m).reshape(-1)
    return new, bound, (d.lora.r or 1) + 4


def _glora_bias(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """bias + bias * D + E + W0 @ C, W0 read from the base weight in blocks of rows."""
    from .baserows import as_tensor

    (c, c_m), (dd, d_m), (e, e_m) = (_glora_path(d, f, x) for x in "CDE")
    s, new, bound = d.scale, exact.clone(), size.clone()
    if dd is not None:
        new, bound = new + s * exact * dd.reshape(-1), bound + abs(s) * size * d_m.reshape(-1)
    if e is not None:
        new, bound = new + s * e.reshape(-1), bound + abs(s) * e_m.reshape(-1)
    if c is not None and d.companion is not None:
        def gather() -> tuple[torch.Tensor, torch.Tensor]:
            w = d.companion
            out, cols = w.info.shape
            item, step = w.info.nbytes // (out * cols), max(1, (1 << 20) // cols)
            wc, wc_m = [], []
            with open(w.path, "rb") as fh:
                for r0 in range(0, out, step):
                    k = min(step, out - r0)
                    fh.seek(w.data_start + w.info.begin + r0 * cols * item)
                    block = as_tensor(bytearray(fh.read(k * cols * item)), w.info.dtype).double().view(k, cols)
                    wc.append(block @ c.reshape(-1))
                    wc_m.append(block.abs() @ c_m.reshape(-1))
            return torch.cat(wc), torch.cat(wc_m)

        wc, wc_m = _once(f, d, gather)
        new, bound = new + s * wc, bound + abs(s) * wc_m
    return new, bound, (d.companion.info.shape[1] if d.companion else 0) + (d.lora.r or 1) + 4


WHOLE_ROWS: dict[str, Callable[[Delta, int, torch.Tensor, torch.Tensor, Factors64, Before], Row]] = {
    "deft": _deft, "peanut": _peanut, "frod": _frod, "osf": _osf, "glora": _glora, "glora_bias": _glora_bias}
