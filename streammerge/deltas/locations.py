"""Where FourierFT's spectrum lies: the first k entries of ``torch.randperm(n, generator=
torch.Generator().manual_seed(seed))``, as PEFT draws them, without building the n-element
permutation (n = out * in: 8 bytes an element would be 1.9 GB for one 8192 x 28672 weight).

torch's CPU randperm (a fact of its implementation, checked against torch in the tests) draws from
mt19937 seeded with the seed's low 32 bits; numpy's legacy ``RandomState`` is the same generator:
- n < 2^32 / 20: Fisher-Yates from the front, ``z = random32() % (n - i)``, swap ``i`` and ``i + z``;
  after step i position i is final, so k draws give the first k;
- larger n: the inside-out variant, ``z = random64() % (i + 1)`` (two draws, the first the high
  word), ``r[i] = r[z]; r[z] = i``; every step may land in the first k, so all n draws are made, in
  vectorised blocks, and only the few that touch the first k positions are followed.
"""

from __future__ import annotations

import numpy as np

SMALL = 0xFFFFFFFF // 20
BLOCK = 1 << 22  # draws per vectorised block (32 MiB of uint64)


def randperm_prefix(n: int, k: int, seed: int) -> np.ndarray:
    """The first ``k`` values of torch's CPU ``randperm(n)`` with a generator seeded ``seed`` (int64)."""
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= n, got k={k}, n={n}")
    state = np.random.RandomState(seed & 0xFFFFFFFF)
    return _front(n, k, state) if n < SMALL else _inside_out(n, k, state)


def _front(n: int, k: int, state: np.random.RandomState) -> np.ndarray:
    steps = min(k, n - 1)
    draws = state.randint(0, 2**32, size=steps, dtype=np.uint64)
    moved: dict[int, int] = {}
    out = np.empty(k, dtype=np.int64)
    for i in range(steps):
        j = i + int(draws[i]) % (n - i)
        out[i] = moved.get(j, j)
        moved[j] = moved.get(i, i)
    if k > steps:  # (k == n: the last position holds what is left)
        out[steps] = moved.get(steps, steps)
    return out


def _inside_out(n: int, k: int, state: np.random.RandomState) -> np.ndarray:
    first = np.empty(k, dtype=np.int64)
    for start in range(0, n, BLOCK):
        i = np.arange(start, min(n, start + BLOCK), dtype=np.uint64)
        words = state.randint(0, 2**32, size=2 * len(i), dtype=np.uint64)
        z = ((words[0::2] << np.uint64(32)) | words[1::2]) % (i + np.uint64(1))
        for h in np.flatnonzero((z < k) | (i < k)):
            step, target = int(i[h]), int(z[h])
            if step < k:
                first[step] = first[target] if target < step else step
            if target < k:
                first[target] = step
    return first
