"""The non-weight files of an output: copied from the base (config changes applied), the tokenizer,
and the index."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..formats.checkpoint import INDEX_NAME, BaseCheckpoint
from ..plan.tokenizer import tokenizer_files
from .directory import STAGING, WEIGHT_SUFFIXES

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapters.safetensors"}
GENERATED = {"README.md"}  # the model card is written for the merge, not copied (output/card.py)
SKIP_DIRS = {".git", ".cache", "__pycache__", STAGING}


def aux_files(base: Path) -> list[Path]:
    """Every non-weight file of the base (config, tokenizer, templates, processors, *.py), relative."""
    found = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(WEIGHT_SUFFIXES) or name in ADAPTER_FILES or (dirpath == str(base) and name in GENERATED):
                continue
            found.append(Path(dirpath, name).relative_to(base))
    return found


def _set_dtype(config: dict[str, Any], dtype_name: str) -> None:
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype_name
    for value in config.values():  # VLM sub-configs: text_config, vision_config ...
        if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
            _set_dtype(value, dtype_name)


def _set_everywhere(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` at the top level and in every sub-config that has it, or is text_config."""
    config[key] = value
    for name, sub in config.items():
        if isinstance(sub, dict) and (key in sub or name == "text_config"):
            _set_everywhere(sub, key, value)


def _drop_everywhere(config: dict[str, Any], key: str) -> None:
    config.pop(key, None)
    for sub in config.values():
        if isinstance(sub, dict):
            _drop_everywhere(sub, key)


def copy_aux_files(base: Path, staging: Path, *, config_dtype: str | None, config_changes: dict[str, Any],
                   config_removed: tuple[str, ...] = ()) -> list[str]:
    """Copy non-weight files into staging; rewrite config.json's dtype when the output dtype
    changed, set ``config_changes`` (e.g. tie_word_embeddings) and remove ``config_removed`` (e.g.
    quantization_config of a dequantized base) at every level."""
    copied = []
    for rel in aux_files(base):
        dst = staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel == Path("config.json") and (config_dtype is not None or config_changes or config_removed):
            try:
                config = json.loads((base / rel).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise OutputError(f"{base / rel}: cannot update it, not valid JSON ({exc})") from None
            if config_dtype is not None:
                _set_dtype(config, config_dtype)
            for key, value in config_changes.items():
                _set_everywhere(config, key, value)
            for key in config_removed:
                _drop_everywhere(config, key)
            dst.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(base / rel, dst)  # follows links: a snapshot's blobs become real files
        copied.append(str(rel))
    return copied


def copy_tokenizer(source: Path, staging: Path) -> list[str]:
    """The tokenizer files of ``source`` (see ``plan/tokenizer.py``) replace the base's."""
    copied = []
    for path in tokenizer_files(source):
        shutil.copyfile(path, staging / path.name)
        copied.append(path.name)
    return copied


def write_index(staging: Path, base: BaseCheckpoint, weight_map: dict[str, str], total_size: int) -> None:
    """The base's index metadata (e.g. total_parameters kept) with the new total_size and weight map."""
    assert base.index_metadata is not None
    doc = {"metadata": {**base.index_metadata, "total_size": total_size}, "weight_map": weight_map}
    (staging / INDEX_NAME).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
