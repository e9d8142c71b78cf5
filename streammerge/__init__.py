"""streammerge: merge adapters into huge safetensors checkpoints without building the model."""

from __future__ import annotations

from ._version import __version__

# None of these import torch at module level, so `import streammerge` and `--help` stay instant.
from .api import MergeReport, merge, merge_many  # noqa: E402
from .errors import StreamMergeError  # noqa: E402
from .events import Event  # noqa: E402
from .inputs import AdapterSpec, load_inputs  # noqa: E402
from .options import MergeOptions  # noqa: E402

__all__ = ["merge", "merge_many", "load_inputs", "AdapterSpec", "MergeOptions", "MergeReport", "Event",
           "StreamMergeError", "__version__"]
