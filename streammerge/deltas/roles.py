"""What the PEFT methods other than LoRA share in the delta registry's protocol: their tensors are
their module's roles (``LoraModule.keys``), no block temporaries and nothing held beyond them unless
they say so."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..plan.types import Delta


class ByRole:
    roles: tuple[str, ...] = ()  # the tensors it holds on the merge device, in this order (none: all the module's)
    block_buffers = 0

    def factor_keys(self, d: Delta) -> list[str]:
        if not self.roles:
            return [k for _, k in d.lora.keys]
        return [d.lora.key(r) for r in self.roles if d.lora.has(r)]

    def held_floats(self, d: Delta) -> int:
        return 0
