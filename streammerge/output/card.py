"""The model card (README.md) of a merged checkpoint: Hub metadata and what the merge was.

YAML front matter (the Hub's card metadata) and a Markdown body, written with PyYAML: importing
huggingface_hub's card module cost 0.44 s of CPU at the end of every merge. The tests parse the
card back with huggingface_hub's ``ModelCard``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..sources import hub

if TYPE_CHECKING:
    from ..inputs import Inputs
    from ..options import MergeOptions
    from ..plan.types import MergePlan

CARD_NAME = "README.md"
_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


# Fields of the base's card that still hold for the merge (its license binds the derivative).
KEPT_FIELDS = ("license", "license_name", "license_link", "language", "pipeline_tag")


def base_card_fields(root: Path) -> dict[str, Any]:
    """The base card's fields that still apply ({} when it has no card or no metadata)."""
    path = root / CARD_NAME
    if not path.is_file():
        return {}
    import yaml

    text = path.read_text(encoding="utf-8", errors="replace")
    found = _FRONT_MATTER.match(text)
    try:
        data = yaml.safe_load(found[1]) if found else None
    except yaml.YAMLError:  # a card without valid YAML front matter: nothing to keep
        return {}
    return {k: data[k] for k in KEPT_FIELDS if data.get(k) is not None} if isinstance(data, dict) else {}


def merge_card(plan: MergePlan, inputs: Inputs, adapters: Sequence[Any], opts: MergeOptions) -> str:
    """The card of one output: base_model is the base's repo id, or the adapters'
    base_model_name_or_path when that is one."""
    named = [a.config.get("base_model_name_or_path") for a in plan.adapters if isinstance(a.config, dict)]
    base_model = (inputs.hub_base.repo if inputs.hub_base else
                  next((n for n in named if isinstance(n, str) and hub.parse(n) is not None), None))
    return model_card(base=inputs.text, base_model=base_model,
                      base_revision=inputs.hub_base.commit if inputs.hub_base else None,
                      adapters=[(str(s.path), s.weight) for s in adapters],
                      dtype=plan.config_dtype or opts.dtype, tensors_merged=len(plan.touched), shards=len(plan.shards),
                      kept=base_card_fields(plan.base.root))


def model_card(*, base: str, base_model: str | None, base_revision: str | None,
               adapters: Sequence[tuple[str, float]], dtype: str, tensors_merged: int, shards: int,
               kept: dict[str, Any] | None = None) -> str:
    """README.md for the merged model: Hub metadata (base_model, base_model_relation, tags) + a body.

    ``base`` and ``adapters`` are as given (repo ids, or local directories shown by name only);
    ``base_model`` is the base's repo id when known (None: the field is left out).
    """
    import yaml

    def shown(text: str) -> str:  # a repo id as given; a local directory by its name only
        return text if hub.parse(text) is not None else Path(text).name

    hub_ids = [a for a, _ in adapters if hub.parse(a) is not None]
    adapters = [(shown(a), w) for a, w in adapters]
    base = shown(base)
    data = {**({"base_model": base_model} if base_model else {}), "base_model_relation": "merge",
            "library_name": "transformers",
            "tags": ["streammerge", "lora", "merge"] + [f"adapter:{a.split('@')[0]}" for a in hub_ids], **(kept or {})}
    lines = [f"- `{name}` with weight {weight:g}" for name, weight in adapters]
    revision = f" at revision `{base_revision}`" if base_revision else ""
    body = (
        f"# Merged model\n\nThe base model `{base}`{revision} with LoRA adapter(s) merged into its weights "
        f"by streammerge {__version__}:\n\n" + "\n".join(lines) + "\n\n"
        f"Each touched weight is `W + sum_i w_i * scale_i * (B_i @ A_i)`, computed in float32 and rounded once "
        f"to {dtype}. {tensors_merged} tensors changed; every other tensor is byte-identical to the base. "
        f"{shards} shard(s); their sha256 are listed in `streammerge.json`.\n\n"
        "Load it like the base model (no PEFT needed).\n"
    )
    return f"---\n{yaml.safe_dump(data, sort_keys=False, allow_unicode=True)}---\n\n{body}"
