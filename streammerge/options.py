"""One frozen, validated set of merge options: what the engine, the fingerprint and the manifest read.

Built once (``MergeOptions.build`` checks every value and names the argument it rejects); a report
is output and never read back as a setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OptionTypeError, OptionValueError
from .memory import DEFAULT_MAX_MEM, parse_size

GGUF_ONLY = ("f16", "f32", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # --dtype values only a GGUF output takes
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32", "fp8", *GGUF_ONLY)


def _size(name: str, value: Any) -> int:
    """A size as bytes (int) or text (``"20GB"``); anything else is refused naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise OptionTypeError(f"{name} must be a number of bytes or a size like '20GB', not {type(value).__name__}")
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise OptionValueError(f"{name}: {exc}") from None
    if value <= 0:
        raise OptionValueError(f"{name} must be positive, got {value}")
    return value


def _strings(name: str, value: Any) -> tuple[str, ...]:
    """One string or a sequence of strings."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise OptionTypeError(f"{name} must be a string or a list of strings, not {type(value).__name__}")


def _regexes(name: str, value: Any) -> tuple[str, ...]:
    patterns = _strings(name, value)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise OptionValueError(f"{name} {pattern!r} is not a valid regex ({exc})") from None
    return patterns


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise OptionTypeError(f"{name} must be a string, not {type(value).__name__}")
    return value


def _path(name: str, value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise OptionTypeError(f"{name} must be a path, not {type(value).__name__}")
    return Path(value)


@dataclass(frozen=True)
class MergeOptions:
    """Every setting of a merge. ``device`` is what was asked for; the device used is resolved by the
    executor and recorded in the report and the fingerprints."""

    device: str = "auto"
    max_mem: int = DEFAULT_MAX_MEM
    dtype: str = "auto"
    overwrite: bool = False
    maps: tuple[str, ...] = ()
    include: tuple[str, ...] = ()  # regexes over base tensor names or adapter modules
    exclude: tuple[str, ...] = ()
    tokenizer: Path | None = None  # where the tokenizer files come from (None: decided per merge)
    progress: bool = True
    checksum: bool = True
    allow_noop: bool = False
    allow_duplicate: bool = False
    strict: bool = False
    low_disk: bool = False
    push_to_hub: str | None = None
    private: bool = False
    hub_revision: str | None = None
    gguf_pre: str | None = None  # a GGUF output's tokenizer.ggml.pre, when its fingerprint is not known

    @classmethod
    def build(cls, **given: Any) -> MergeOptions:
        """Validate keyword arguments into options; an unknown name or a wrong type is refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise OptionTypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for flag in ("overwrite", "progress", "checksum", "allow_noop", "allow_duplicate", "strict", "low_disk",
                     "private"):
            if flag in given and not isinstance(given[flag], bool):
                raise OptionTypeError(f"{flag} must be True or False, not {given[flag]!r}")
        values = dict(given)
        if "max_mem" in values:
            values["max_mem"] = _size("max_mem", values["max_mem"])
        if "dtype" in values and values["dtype"] not in DTYPE_CHOICES:
            raise OptionValueError(f"dtype {values['dtype']!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if "device" in values and not isinstance(values["device"], str):
            raise OptionTypeError(f"device must be a string such as 'cpu', 'cuda:0' or 'auto', not {values['device']!r}")
        for name, check in (("maps", _strings), ("include", _regexes), ("exclude", _regexes)):
            if name in values:
                values[name] = check(name, values[name])
        for name in ("push_to_hub", "hub_revision", "gguf_pre"):
            if name in values:
                values[name] = _optional_str(name, values[name])
        if "tokenizer" in values:
            values["tokenizer"] = _path("tokenizer", values["tokenizer"])
        return cls(**values)

    def recorded(self) -> dict[str, Any]:
        """What the manifest keeps (and ``verify`` reads back): the options that change the bytes."""
        doc: dict[str, Any] = {"dtype": self.dtype, "device": self.device, "max_mem": self.max_mem,
                               "maps": list(self.maps), "checksum": self.checksum}
        if self.include or self.exclude:
            doc.update(include=list(self.include), exclude=list(self.exclude))
        return doc
