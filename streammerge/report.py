"""What a merge did, per output: written by the API at the end, never read back as input."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import Event

SURVIVAL_WARN = 0.5  # a re-quantized weight keeping less of its delta's direction than this is warned about


@dataclass
class MergeReport:
    output: str
    device: str  # the device the merge ran on (resolved: "cpu", "cuda:0")
    max_mem: int
    dtype: str
    shards: int = 0
    shards_resumed: int = 0
    tensors_merged: int = 0  # deltas or token rows applied (on a replaced base weight too)
    tensors_converted: int = 0  # only the dtype changed
    tensors_replaced: int = 0  # base weight taken from the adapter (merged on top or not)
    tensors_merged_on_replaced: int = 0  # of those, merged on top (counted in tensors_merged too)
    tensors_copied: int = 0  # byte for byte
    tensors_excluded: int = 0  # left as in the base by --include / --exclude
    adapter_modules: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    baseline_rss: int = 0
    peak_rss: int = 0
    peak_gpu: int | None = None
    chunk_elements: int = 0
    shards_downloaded: int = 0  # Hub base shards fetched by this run
    base_commit: str | None = None  # the Hub commit the base was read at
    pushed_to: str | None = None  # the Hub commit made by --push-to-hub
    tokenizer_from: str | None = None
    base_kind: str = "16-bit"  # or "quantized (scheme)"
    quantized: dict[str, Any] | None = None  # a quantized base: scheme, weights dequantized, dtype, bytes
    requantized: dict[str, float] = field(default_factory=dict)  # --dtype fp8: tensor -> share of its delta kept
    files_copied: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cluster: dict[str, Any] | None = None  # run on a cluster: nodes, retries, seconds (distributed/)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Survival:
    """Events listener: each re-quantized tensor's share of its delta kept (``survives``), per output."""

    def __init__(self) -> None:
        self.by_output: dict[str | None, dict[str, float]] = {}

    def __call__(self, event: Event) -> None:
        if event.kind == "tensor" and "survives" in event.data:
            self.by_output.setdefault(event.output, {})[event.data["name"]] = float(event.data["survives"])

    def warning(self, output: str) -> str | None:
        """One line for the tensors that kept less than SURVIVAL_WARN of their delta, if any."""
        low = sorted((v, k) for k, v in self.by_output.get(output, {}).items() if v < SURVIVAL_WARN)
        if not low:
            return None
        shown = ", ".join(f"{k} {v:.0%}" for v, k in low[:3]) + (" ..." if len(low) > 3 else "")
        return (f"re-quantized to FP8, {len(low)} merged weight(s) kept under {SURVIVAL_WARN:.0%} of their delta "
                f"({shown}); a 16-bit --dtype (bf16) keeps all of it")
