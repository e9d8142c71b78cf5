"""TinyLoRA's shared vectors: which ``base_model.tinylora_v.<g>`` each module uses.

PEFT gives each target module an index i (its order in the model's ``named_modules``, which the
adapter file does not record) and draws the module's projection P (u, r, r) from
``torch.normal(0, 1 / sqrt(r), generator=manual_seed(projection_seed + i))``; i then picks the group
``min(i // group_size, groups - 1)``, groups = max(1, round(N (1 - weight_tying))), group_size =
max(1, N // groups), N the number of target modules. The saved P says i: it is the one of the N
seeds that draws it (checked against every seed; a P no seed draws is refused).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..errors import UnsupportedError

if TYPE_CHECKING:
    from .types import LoraAdapter

V_PREFIX = "base_model.tinylora_v."


def assign_vectors(adapter: LoraAdapter) -> LoraAdapter:
    """The adapter with each module's shared vector among its keys (role ``v``)."""
    import torch

    config, count = adapter.config, len(adapter.modules)
    seed, tying = config.get("projection_seed", 42), config.get("weight_tying", 0.0)
    if not isinstance(seed, int) or not isinstance(tying, (int, float)) or not 0 <= tying <= 1:
        raise UnsupportedError(f"{adapter.path}: TinyLoRA projection_seed {seed!r} / weight_tying {tying!r} not read")
    groups = max(1, round(count * (1.0 - tying)))
    size = max(1, count // groups)
    drawn: dict[tuple[int, ...], torch.Tensor] = {}
    modules = {}
    for name, lora in adapter.modules.items():
        p = adapter.load_raw(lora.key("P")).float()
        shape = tuple(p.shape)
        if shape not in drawn:  # every seed's P at this shape, once
            drawn[shape] = torch.stack([torch.normal(0.0, 1.0 / shape[1] ** 0.5, size=shape,
                                                     generator=torch.Generator().manual_seed(seed + i))
                                        for i in range(count)])
        hits = torch.nonzero((drawn[shape] - p).flatten(1).abs().amax(1) <= 1e-6).flatten().tolist()
        if len(hits) != 1:
            raise UnsupportedError(f"{adapter.weights_path}: TinyLoRA {name!r}: its projection P is drawn by "
                                   f"{'no' if not hits else 'more than one'} of the {count} layer seeds from "
                                   f"projection_seed {seed}: which shared vector it uses cannot be told (all "
                                   "target modules must be in the adapter, saved by PEFT)")
        key = f"{V_PREFIX}{min(hits[0] // size, groups - 1)}"
        if key not in adapter.tensors:
            raise UnsupportedError(f"{adapter.weights_path}: TinyLoRA {name!r} uses {key}, which is not saved")
        modules[name] = dataclasses.replace(lora, keys=(*lora.keys, ("v", key)))
    return dataclasses.replace(adapter, modules=modules)
