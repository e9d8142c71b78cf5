"""The plan: adapter modules mapped to base tensors through the name table, every shape checked,
the output laid out; built from headers alone (no tensor data, no torch)."""

from .build import build_plan
from .types import CONFIG_DTYPE_NAMES, DTYPE_CHOICES, Delta, MergePlan, Source, TensorPlan, TokenRows

__all__ = ["build_plan", "CONFIG_DTYPE_NAMES", "DTYPE_CHOICES", "Delta", "MergePlan", "Source", "TensorPlan",
           "TokenRows"]
