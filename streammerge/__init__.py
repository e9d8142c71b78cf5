"""streammerge: merge LoRA adapters into huge safetensors checkpoints without building the model."""

from __future__ import annotations

__version__ = "0.1.0"

# None of these import torch at module level, so `import streammerge` and `--help` stay instant.
from .errors import StreamMergeError  # noqa: E402
from .merge import AdapterSpec, MergeReport, load_inputs, merge, merge_many  # noqa: E402

__all__ = ["merge", "merge_many", "load_inputs", "AdapterSpec", "MergeReport", "StreamMergeError", "__version__"]
