"""verify's float64 reading of the non-LoRA methods on one row (formulas of its own, from PEFT's
definitions, not the deltas' code): each takes the row so far (``exact``), the magnitude of its
terms (``size``, for the float32 bound) and returns both changed, with the float32 roundings the
merge's arithmetic may have made on the way (for the bound ``roundings * 2^-24 * size``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .deltas.spectral import spectrum_locations

if TYPE_CHECKING:
    from .plan.types import Delta


class Factors64:
    """An adapter's tensors in float64, each read once per verify."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        self.gathered: dict[tuple[int, str], Any] = {}  # what a method needs of every row (checkwhole.py)

    def __call__(self, d: Delta, role: str) -> torch.Tensor:
        key = d.lora.key(role)
        entry = (id(d.adapter), key)
        if entry not in self._cache:
            self._cache[entry] = d.adapter.load(key).double()
        return self._cache[entry]

    def whole(self, d: Delta, name: str, *, magnitude: bool = False) -> torch.Tensor:
        """A LoKr factor saved whole, or the product of its two halves (of their magnitudes)."""
        if d.lora.has(name):
            return self(d, name).abs() if magnitude else self(d, name)
        a, b = self(d, name + "a"), self(d, name + "b")
        return a.abs() @ b.abs() if magnitude else a @ b


Row = tuple[torch.Tensor, torch.Tensor, int]
Before = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # another row (and its |terms|) before this delta


def _ia3(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    l = f(d, "l").reshape(-1) * d.scale  # noqa: E741  (PEFT's name)
    factor = l[row] if d.method == "ia3_rows" else l  # rows: one number for the row; columns / bias: per column
    return exact * factor, size * factor.abs(), 1


def _loha(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    w1a, w1b, w2a, w2b = (f(d, r) for r in ("w1a", "w1b", "w2a", "w2b"))
    term = d.scale * (w1a[row] @ w1b) * (w2a[row] @ w2b)
    bound = abs(d.scale) * (w1a[row].abs() @ w1b.abs()) * (w2a[row].abs() @ w2b.abs())
    return exact + term, size + bound, w1a.shape[1] + w2a.shape[1] + 3


def _lokr(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    w1, w2 = f.whole(d, "w1"), f.whole(d, "w2")
    b1 = w2.shape[0]
    term = d.scale * torch.outer(w1[row // b1], w2[row % b1]).reshape(-1)  # row of kron(w1, w2)
    m1, m2 = f.whole(d, "w1", magnitude=True), f.whole(d, "w2", magnitude=True)
    bound = abs(d.scale) * torch.outer(m1[row // b1], m2[row % b1]).reshape(-1)
    ranks = sum(f(d, r).shape[1] for r in ("w1a", "w2a") if d.lora.has(r))
    return exact + term, size + bound, ranks + 3


def _vera(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    cols = exact.shape[0]
    b_row = f(d, "lambda_b")[row] * f(d, "B")[row]  # (r,)
    a = f(d, "lambda_d")[:, None] * f(d, "A")[:, :cols]  # (r, in), or PVeRA's (2r, in): its means first
    a = a[: b_row.shape[0]]
    return exact + d.scale * (b_row @ a), size + abs(d.scale) * (b_row.abs() @ a.abs()), a.shape[0] + 2


def _adalora(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    ae, b = f(d, "A") * f(d, "E"), f(d, "B")[row]  # (k, in), (k,)
    return exact + d.scale * (b @ ae), size + abs(d.scale) * (b.abs() @ ae.abs()), ae.shape[0] + 2


def _oft_blocks(d: Delta, f: Factors64) -> torch.Tensor:
    """Each block's rotation (float64), from the config's parameterisation: a polynomial in Q with
    PEFT's coefficients (1, 2, ..., 2, 1) or the exact Cayley map (I - Q)(I + Q)^-1."""
    config, vec = d.adapter.config, f(d, "R")
    b = next(k for k in range(2, 4096) if k * (k - 1) // 2 == vec.shape[1])
    q = torch.zeros(vec.shape[0], b, b, dtype=torch.float64)
    for n, (i, j) in enumerate((i, j) for i in range(b) for j in range(i + 1, b)):
        q[:, i, j], q[:, j, i] = vec[:, n], -vec[:, n]
    if config.get("coft"):
        eps = float(config.get("eps", 6e-5)) / vec.shape[0] ** 0.5
        norms = torch.linalg.matrix_norm(q)[:, None, None]
        q = torch.where(norms > eps, q * eps / norms, q)
    eye = torch.eye(b, dtype=torch.float64)
    if not config.get("use_cayley_neumann", True):
        return (eye - q) @ torch.linalg.inv(eye + q)
    t = int(config.get("num_cayley_neumann_terms", 5))
    coefficients = [1.0] if t <= 1 else [1.0, 2.0] if t == 2 else [1.0] + [2.0] * max(2, t - 2) + [1.0]
    return sum(c * torch.linalg.matrix_power(q, k) for k, c in enumerate(coefficients))


def _oft(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    r = _oft_blocks(d, f)
    cols, b = exact.shape[0], r.shape[-1]
    r = r.expand(cols // b, b, b) if r.shape[0] == 1 else r
    rotate = lambda v: torch.einsum("rk,rck->rc", v.view(-1, b), r).reshape(-1)  # noqa: E731  (v_blk @ R_blk^T)
    magnitude = torch.einsum("rk,rck->rc", size.view(-1, b), r.abs()).reshape(-1)
    return rotate(exact), magnitude, b + 4


def _hra(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """W' = W R with PEFT's R, applied to the row reflection by reflection (R is never formed: it is
    in x in); |x - 2 (x u) u| <= |x| + 2 (|x| |u|) |u| bounds each step's terms."""
    u = f(d, "u")
    if d.adapter.config.get("apply_GS"):
        q = torch.linalg.qr(u).Q * torch.sign(torch.linalg.qr(u).R.diagonal())  # Gram-Schmidt's signs
        return exact - 2 * (exact @ q) @ q.T, size + 2 * (size @ q.abs()) @ q.abs().T, 4 * u.shape[1] + 4
    for i in range(u.shape[1]):
        unit = u[:, i] / u[:, i].norm()
        exact, size = exact - 2 * (exact @ unit) * unit, size + 2 * (size @ unit.abs()) * unit.abs()
    return exact, size, 4 * u.shape[1] + 4


def _shira(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    idx, values = f(d, "indices").long(), f(d, "values") * d.scale
    mine = idx[0] == row
    term = torch.zeros_like(exact).index_add_(0, idx[1][mine], values[mine])  # (repeated indices add up)
    return exact + term, size + term.abs(), 2


def _road(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """Row ``row`` of R W: PEFT's rotation of the row with the one half a group away (``_apply_road``)."""
    g, variant = d.lora.row_group, str(d.adapter.config["variant"])
    theta, alpha = f(d, "theta"), f(d, "alpha")
    if variant == "road_1":  # g/2 values a group, the same for both halves
        theta, alpha = (v.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten() for v in (theta, alpha))
    if variant == "road_4":  # [angle, scale] for c, then for s, per group
        t, a = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)
        c, s = a[:, 0].flatten()[row] * t[:, 0].flatten()[row].cos(), a[:, 1].flatten()[row] * t[:, 1].flatten()[row].sin()
    else:
        c, s = alpha[row] * theta[row].cos(), alpha[row] * theta[row].sin()
    first_half = row % g < g // 2
    partner, partner_size = before(row + g // 2 if first_half else row - g // 2)
    sign = -1.0 if first_half else 1.0
    return c * exact + sign * s * partner, abs(c) * size + abs(s) * partner_size, 4


def _miss(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """PEFT's MiSS on one row: B^T tiled over the column blocks, or (bat) the row's blocks times B_i plus B_i."""
    b, fn, cols = f(d, "B"), d.adapter.config.get("init_weights"), exact.shape[0]
    if fn == "bat":
        r = b.shape[1]
        bi = b[row // r]
        blocks = exact.view(-1, r)  # (in/r, r): the row's column blocks
        term = (blocks @ bi + bi[row % r]).reshape(-1) * d.scale
        magnitude = (size.view(-1, r) @ bi.abs() + bi[row % r].abs()).reshape(-1) * abs(d.scale)
        return exact + term, size + magnitude, r + 2
    column = b[:, row % b.shape[1]] if fn == "mini" else b[:, row]  # (r,)
    term = d.scale * column[torch.arange(cols) % b.shape[0]]
    return exact + term, size + term.abs(), 2


def _c3a(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """Row ``row`` of PEFT's circulant delta: each column block's kernel rolled by the row's place in its block."""
    kernel = f(d, "kernel")
    b, cols = kernel.shape[2], exact.shape[0]
    term = torch.roll(kernel[row // b], shifts=row % b, dims=-1).reshape(-1) * (d.scale / cols)
    return exact + term, size + term.abs(), 2


def _delora(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    a, b, lam, norm = (f(d, r) for r in ("A", "B", "lambda", "w_norm"))
    bound = lam / a.shape[0] / (torch.linalg.vector_norm(a, dim=1).clamp(min=1e-4)
                                * torch.linalg.vector_norm(b, dim=0).clamp(min=1e-4))
    term = d.scale * ((b[row] * bound) @ a) * norm
    return exact + term, size + abs(d.scale) * ((b[row] * bound).abs() @ a.abs()) * norm.abs(), a.shape[0] + 4


def _hira(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    product = f(d, "B")[row] @ f(d, "A")  # (in,)
    return exact * (1 + d.scale * product), size * (1 + abs(d.scale) * product.abs()), f(d, "A").shape[0] + 3


def _beft(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    term = d.scale * f(d, "bias").reshape(-1)
    return exact + term, size + term.abs(), 1


def _randlora(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """PEFT's RandLoRA update, (update_B.T @ update_A.T).T, formed whole in float64 for this row."""
    lam, gamma, a, b = (f(d, r) for r in ("lambda", "gamma", "A", "B"))
    out, cols = d.shape
    small, large, bases = min(out, cols), max(out, cols), gamma.shape[0]
    unique = (lam[:, :, None] * a[:, :bases, :small] * gamma[None]).flatten(end_dim=1)
    shared = b[:large, :bases, :].flatten(start_dim=1)
    first, second = (unique, shared) if small == cols else (shared.T, unique.T)  # get_scaled_bases's order
    # PEFT's update is (first.T @ second.T).T = second @ first: its row ``row`` is second[row] @ first
    update, magnitude = second[row] @ first, second[row].abs() @ first.abs()
    return exact + d.scale * update, size + abs(d.scale) * magnitude, unique.shape[0] + 2


def _gralora(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """Row ``row`` of GraLoRA's delta, block by block: output block i, input block j:
    B[i, j*sub:(j+1)*sub, o'] @ A[j, :, i*sub:(i+1)*sub].T (+ the hybrid LoRA's row)."""
    a, b = f(d, "A"), f(d, "B")
    k, part, r = a.shape
    sub, per_block = r // k, b.shape[2]
    i, o = divmod(row, per_block)
    term = torch.cat([b[i, j * sub : (j + 1) * sub, o] @ a[j, :, i * sub : (i + 1) * sub].T for j in range(k)])
    bound = torch.cat([b[i, j * sub : (j + 1) * sub, o].abs() @ a[j, :, i * sub : (i + 1) * sub].abs().T
                       for j in range(k)])
    if d.lora.has("A_general"):
        term = term + f(d, "B_general")[row] @ f(d, "A_general")
        bound = bound + f(d, "B_general")[row].abs() @ f(d, "A_general").abs()
    return exact + d.scale * term, size + abs(d.scale) * bound, r + 2


def _boft(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """PEFT's BOFT on one row: for each butterfly factor the columns permuted, the blocks rotated by
    the Cayley map of their skew parts, permuted back; then the row scale."""
    from .deltas.boft import butterfly_perm

    r, s = f(d, "R"), f(d, "s")[row, 0]
    n, blocks, b = r.shape[0], r.shape[1], r.shape[2]
    skew = 0.5 * (r - r.transpose(-1, -2))
    eye = torch.eye(b, dtype=torch.float64)
    q = (eye - skew) @ torch.linalg.inv(eye + skew)  # (factors, blocks, b, b)
    for i in range(n):
        perm = torch.tensor(butterfly_perm(blocks * b, blocks // 2**i, b // 2, n))
        x, m = torch.empty_like(exact), torch.empty_like(size)
        x[perm], m[perm] = exact, size
        x = torch.einsum("rk,rck->rc", x.view(blocks, -1), q[i]).reshape(-1)
        m = torch.einsum("rk,rck->rc", m.view(blocks, -1), q[i].abs()).reshape(-1)
        exact, size = x[perm], m[perm]
    return exact * s, size * abs(s), n * (b + 5)


def _vb_side(d: Delta, f: Factors64, side: str) -> torch.Tensor:
    """One side's low-rank rows as PEFT loads a VB-LoRA: logits of -inf but at the top k (from the
    saved logits, or rebuilt from the saved top-k weights), softmax, times the bank."""
    bank, k = f(d, "bank"), int(d.adapter.config["topk"])
    if d.lora.has(f"logits_{side}"):
        logits = f(d, f"logits_{side}")
        kept = torch.full_like(logits, float("-inf")).scatter(-1, logits.topk(k, dim=-1).indices,
                                                              logits.topk(k, dim=-1).values)
    else:
        idx, w = f(d, f"{side}_idx").long(), f(d, f"{side}_w")
        w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)
        kept = torch.full((*idx.shape[:-1], bank.shape[0]), float("-inf"), dtype=torch.float64).scatter(-1, idx, w.log())
    return kept.softmax(dim=-1) @ bank  # (..., length)


def _vblora(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    a = _vb_side(d, f, "A")
    a = a.reshape(a.shape[0], -1)  # (r, in)
    b = _vb_side(d, f, "B")
    b = b.transpose(1, 2).reshape(-1, b.shape[1])  # (out, r)
    return exact + d.scale * (b[row] @ a), size + abs(d.scale) * (b[row].abs() @ a.abs()), a.shape[0] + 4


def _supertuning(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    cols = exact.shape[0]
    flat, values = d.adapter.load_raw(d.lora.key("flat")).long(), f(d, "values") * d.adapter.weight
    mine = flat // cols == row
    term = torch.zeros_like(exact).index_add_(0, flat[mine] % cols, values[mine])
    size = size + term.abs()
    if d.lora.has("A"):
        a, b = f(d, "A"), f(d, "B")[row]
        term = term + d.scale * (b @ a)
        size = size + abs(d.scale) * (b.abs() @ a.abs())
    return exact + term, size, (f(d, "A").shape[0] if d.lora.has("A") else 0) + 3


def _unilora(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    theta = f(d, "theta")
    a = theta[d.adapter.load_raw(d.lora.key("idx_A")).long()] * f(d, "scales_A")  # (r, in)
    b = theta[d.adapter.load_raw(d.lora.key("idx_B")).long()[row]] * f(d, "scales_B")[row]  # (r,)
    return exact + d.scale * (b @ a), size + abs(d.scale) * (b.abs() @ a.abs()), a.shape[0] + 3


def _fourierft(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """Row ``row`` of scaling * Re(ifft2(F)): sum_k f_k cos(2 pi (u_k row / out + v_k c / in)) / (out in)."""
    import math

    spectrum = f(d, "spectrum")
    out, cols = d.shape
    u, v = spectrum_locations(d, spectrum.shape[0])
    phase = ((u * row) % out).double()[None, :] / out + (torch.outer(torch.arange(cols), v) % cols).double() / cols
    term = torch.cos(2 * math.pi * phase) @ spectrum * (d.scale / (out * cols))
    bound = torch.full_like(exact, float(spectrum.abs().sum()) * abs(d.scale) / (out * cols))
    return exact + term, size + bound, spectrum.shape[0] + 8


def _tinylora(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """B[row] (sum_i v_i P_i) A."""
    a, b, p, v = (f(d, r) for r in ("A", "B", "P", "v"))
    rotation = (v[:, None, None] * p).sum(0)
    term, bound = b[row] @ rotation @ a, b[row].abs() @ (v.abs()[:, None, None] * p.abs()).sum(0) @ a.abs()
    return exact + d.scale * term, size + abs(d.scale) * bound, v.shape[0] + 2 * a.shape[0] + 3


def _waveft(d: Delta, row: int, exact: torch.Tensor, size: torch.Tensor, f: Factors64, before: Before) -> Row:
    """Row ``row`` of scaling * (the spectrum, or its one-level synthesis): a coefficient at (i, j) of a
    quadrant reaches rows 2i + a - top (a < L), there with row-filter tap a (the high-pass filter in
    the right quadrants) times every column tap b at 2j + b - left (high-pass in the lower ones)."""
    from .deltas.spectral import synthesis_grid, wavelet_filters

    spectrum = f(d, "spectrum")
    out, cols = d.shape
    u, v = spectrum_locations(d, spectrum.shape[0])
    term = torch.zeros_like(exact)
    if not d.adapter.config.get("use_idwt", True):
        mine = u == row
        term.index_add_(0, v[mine], spectrum[mine])
    else:
        lo, hi = (torch.tensor(x, dtype=torch.float64) for x in
                  wavelet_filters(str(d.adapter.config.get("wavelet_family", "db1"))))
        taps = lo.shape[0]
        i, j, right, lower, top, left = synthesis_grid(u, v, out, cols, taps)
        a = row + top - 2 * i
        hit = (a >= 0) & (a < taps)
        tap = torch.where(right[hit], hi[a[hit].clamp(0, taps - 1)], lo[a[hit].clamp(0, taps - 1)])
        for b in range(taps):
            value = spectrum[hit] * tap * torch.where(lower[hit], hi[b], lo[b])
            col = 2 * j[hit] + b - left
            keep = (col >= 0) & (col < cols)
            term.index_add_(0, col[keep], value[keep])
    term = term * d.scale
    return exact + term, size + term.abs(), 4


EXTRA_ROWS: dict[str, Callable[[Delta, int, torch.Tensor, torch.Tensor, Factors64, Before], Row]] = {
    "ia3_rows": _ia3, "ia3_columns": _ia3, "ia3_bias": _ia3, "loha": _loha, "lokr": _lokr, "vera": _vera, "adalora": _adalora, "oft": _oft, "hra": _hra, "shira": _shira, "road": _road, "miss": _miss, "c3a": _c3a, "delora": _delora, "hira": _hira, "pvera": _vera, "beft": _beft, "randlora": _randlora, "gralora": _gralora, "boft": _boft, "vblora": _vblora, "supertuning": _supertuning, "unilora": _unilora, "fourierft": _fourierft, "tinylora": _tinylora, "waveft": _waveft}
