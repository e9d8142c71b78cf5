"""FourierFT's spectrum locations: the first k of torch's CPU randperm(n) from the saved seed,
regenerated without the n-element permutation, held against torch.randperm itself."""

from __future__ import annotations

import pytest
import torch

from streammerge.deltas.locations import SMALL, randperm_prefix


@pytest.mark.parametrize("n, k, seed", [(10, 10, 777), (10, 3, 1), (2, 1, 0), (7168, 50, 777), (4096, 4096, 5),
                                        (1 << 20, 1000, 2**33 + 7)])
def test_prefix_is_torch_randperms(n: int, k: int, seed: int) -> None:
    want = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    assert torch.equal(torch.from_numpy(randperm_prefix(n, k, seed)), want)


@pytest.mark.slow
@pytest.mark.parametrize("n", [SMALL - 1, SMALL, 8192 * 28672])
def test_prefix_of_a_large_permutation_is_torch_randperms(n: int) -> None:
    """Both sides of torch's switch at 2^32 / 20 to its inside-out variant (64-bit draws), and an 8192 x
    28672 weight: about 25 s and 2 GB each (torch's own permutation)."""
    want = torch.randperm(n, generator=torch.Generator().manual_seed(777))[:1000]
    assert torch.equal(torch.from_numpy(randperm_prefix(n, 1000, 777)), want)


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(ValueError):
        randperm_prefix(4, 5, 0)
