"""Inputs: the base (local or Hub) and the adapters, opened and validated, and each output's plan.

Reads headers and configs only (and, to refuse an adapter that changes nothing, lora_B factors
until a non-zero one is found); no torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapters import LoraAdapter, changes_something, read_adapter
from .codecs import quantization
from .errors import OptionTypeError, PlanError
from .formats.checkpoint import BaseCheckpoint, open_base
from .options import MergeOptions
from .plan import build_plan
from .plan.keymap import Rule, parse_map
from .plan.types import MergePlan
from .sources import hub, modelscope

_CACHE_DIR = re.compile(r"models--([^/]+)--([^/]+)")  # a Hugging Face cache folder names its repo
# How quantized variants of a model are named on the Hub (unsloth's "-bnb-4bit", "-FP8", "-AWQ" ...).
_QUANTIZED_NAME = re.compile(r"[-_.](bnb[-_.]?4bit|[48]bit|fp8|awq|gptq|int[48]|nf4)$", re.I)


def _variant_of(a: str, b: str) -> bool:
    """Two repo ids for one model, one of them a quantized variant of the other: the same name (the
    org may differ) once a quantization suffix is taken off."""
    name_a, name_b = a.rsplit("/", 1)[-1], b.rsplit("/", 1)[-1]
    quantized = [bool(_QUANTIZED_NAME.search(n)) for n in (name_a, name_b)]
    return quantized[0] != quantized[1] and _QUANTIZED_NAME.sub("", name_a) == _QUANTIZED_NAME.sub("", name_b)


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter directory (or repo id) and its weight in a weighted sum (1.0 for a single adapter)."""

    path: Path
    weight: float = 1.0


def adapter_specs(adapters: Any) -> list[AdapterSpec]:
    """One adapter (a path, a repo id, an ``AdapterSpec``) or a sequence of them."""
    if isinstance(adapters, (str, os.PathLike, AdapterSpec)):
        adapters = [adapters]
    if not isinstance(adapters, Sequence) or not adapters:
        raise OptionTypeError(f"adapters must be a path, an AdapterSpec or a non-empty list of them, not {adapters!r}")
    specs = []
    for a in adapters:
        if isinstance(a, AdapterSpec):
            specs.append(a)
        elif isinstance(a, (str, os.PathLike)):
            specs.append(AdapterSpec(Path(a)))
        else:
            raise OptionTypeError(f"adapters: {a!r} is not a path or an AdapterSpec")
    return specs


def _repo_of(text: Any) -> str | None:
    """The Hub repo id a name stands for: ``org/name`` itself, or a cache folder ``models--org--name``."""
    if not isinstance(text, str) or not text:
        return None
    if re.fullmatch(hub.REPO_ID, text.split("@")[0]) and not text.startswith((".", "/")):
        return text.split("@")[0].lower()
    found = _CACHE_DIR.search(text)
    return f"{found[1]}/{found[2]}".lower() if found else None


@dataclass
class Inputs:
    """The opened base, shared by every output's plan."""

    text: str  # as given
    checkpoint: BaseCheckpoint
    hub_base: hub.HubBase | None

    @property
    def base_repo(self) -> str | None:
        """Which model the base is, when known: its repo id, or its config's ``_name_or_path``."""
        return self.hub_base.repo.lower() if self.hub_base else _repo_of(self.checkpoint.config.get("_name_or_path"))

    def plan(self, specs: list[AdapterSpec], opts: MergeOptions, *,
             small_files_dir: Path | None = None) -> tuple[MergePlan, list[str]]:
        """One output's plan, and the warnings about its inputs."""
        loaded = [self._read(spec, small_files_dir) for spec in specs]
        if not opts.allow_duplicate:
            _refuse_duplicates(loaded)
        warnings, notes = self._base_mismatches(loaded)
        if warnings and opts.strict:
            raise PlanError(f"{warnings[0]} (--strict)")
        user_rules: tuple[Rule, ...] = tuple(parse_map(m) for m in opts.maps)
        plan = build_plan(self.checkpoint, loaded, dtype=opts.dtype, user_rules=user_rules, include=opts.include,
                          exclude=opts.exclude, tokenizer=opts.tokenizer)
        plan.notes.extend(notes)
        if not opts.allow_noop:
            _refuse_noop(loaded)
            if plan.excluded and not any(t.merged or t.source is not None for t in plan.tensors()):
                raise PlanError(f"--include/--exclude leave nothing to merge ({len(plan.excluded)} excluded, e.g. "
                                f"{plan.excluded[0]}); check the patterns, or pass --allow-noop")
        return plan, warnings

    @staticmethod
    def _read(spec: AdapterSpec, small_files_dir: Path | None) -> LoraAdapter:
        text = str(spec.path)
        path, origin = (modelscope.resolve(text, role="adapter") if modelscope.is_modelscope_id(text) else
                        hub.resolve_with_origin(text, role="adapter", local_dir=small_files_dir))
        return dataclasses.replace(read_adapter(path, weight=spec.weight), origin=origin)

    def _base_mismatches(self, adapters: list[LoraAdapter]) -> tuple[list[str], list[str]]:
        """(warnings: an adapter made for another model; notes: one made on the quantized variant of
        this base, or on the 16-bit original of this quantized base, which QLoRA merges both ways)."""
        base = self.base_repo
        shown = self.hub_base.repo if self.hub_base else self.checkpoint.config.get("_name_or_path")
        kind = "16-bit" if quantization(self.checkpoint.config) is None else "quantized"
        warnings: list[str] = []
        notes: list[str] = []
        for a in adapters:
            named = a.config.get("base_model_name_or_path")
            trained = _repo_of(named)
            if not (base and trained and trained != base):
                continue
            if _variant_of(trained, base):
                other = "quantized" if kind == "16-bit" else "16-bit"
                notes.append(f"adapter {a.path} was trained on {named}, the {other} variant of the base {shown}: "
                             f"merged into the {kind} base"
                             + (" (the usual QLoRA export)" if kind == "16-bit" else ", dequantized exactly"))
            else:
                warnings.append(f"adapter {a.path} was trained on {named} (its base_model_name_or_path) but the base "
                                f"is {shown}; check that this is the model it was made for")
        return warnings, notes


def _refuse_duplicates(adapters: list[LoraAdapter]) -> None:
    seen: dict[str, Path] = {}
    for a in adapters:
        key = a.origin or str(a.path.resolve())
        if key in seen:
            raise PlanError(f"adapter {a.path} is given twice (also as {seen[key]}); give it once with a weight "
                            "(DIR:WEIGHT), or pass --allow-duplicate to add it twice")
        seen[key] = a.path


def _refuse_noop(adapters: list[LoraAdapter]) -> None:
    for adapter in adapters:
        if not changes_something(adapter):
            lora = all(m.method == "lora" for m in adapter.modules.values())
            why = "its weight is 0" if adapter.weight == 0 else (
                ("every lora_B is zero" if lora else "every module is an identity as saved (a factor of zeros, or an "
                 "IA3 vector of ones)") + ", as PEFT initialises it: was the adapter saved before training?")
            raise PlanError(f"adapter {adapter.path} changes nothing ({why}); "
                            "pass --allow-noop to write an unchanged copy anyway")


def open_inputs(base: str | os.PathLike[str], opts: MergeOptions | None = None, *,
                small_files_dir: Path | None = None) -> Inputs:
    """Open and validate the base from headers only. A Hub base is opened without its shards (their
    headers are read remotely when not cached). ``small_files_dir``: where Hub files go instead of
    the user's cache (--low-disk)."""
    text = str(base)
    if modelscope.is_modelscope_id(text):  # brought into its cache first (see sources/modelscope.py)
        root, origin = modelscope.resolve(text, role="base", low_disk=bool(opts and opts.low_disk))
        return Inputs(text, dataclasses.replace(open_base(root), origin=origin), None)
    hub_base = hub.open_hub_base(text, small_files_dir=small_files_dir) if hub.is_repo_id(text) else None
    return Inputs(text, hub_base.checkpoint if hub_base else open_base(Path(text)), hub_base)


def load_inputs(base: str | os.PathLike[str], adapters: Any, *, dtype: str = "auto", maps: Sequence[str] = (),
                allow_noop: bool = False, **options: Any) -> MergePlan:
    """The plan over a base whose shards are all local: a Hub repo is resolved whole first."""
    local = str(base) if modelscope.is_modelscope_id(str(base)) else hub.resolve(str(base), role="base")
    opts = MergeOptions.build(dtype=dtype, maps=tuple(maps), allow_noop=allow_noop, **options)
    return open_inputs(local, opts).plan(adapter_specs(adapters), opts)[0]
