"""The module-name mapping table: adapter module paths -> tensor names in the base checkpoint.

Adapters carry the model's in-memory module names; checkpoints on disk may use older or newer
names. Every rule whose pattern matches a module proposes a candidate; candidates absent from the
base's ``weight_map`` are dropped; exactly one must remain. Adding a model family is adding a row.
Pure strings: no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InputError, PlanError


@dataclass(frozen=True)
class Rule:
    """``re.sub(pattern, replacement, module, count=1)`` proposes an on-disk module path."""

    family: str
    pattern: str
    replacement: str

    def candidate(self, module: str) -> str | None:
        new, n = re.subn(self.pattern, self.replacement, module, count=1)
        return new if n else None


# transformers >= 4.52 renamed multimodal modules in memory while many checkpoints on disk keep
# the old names (and the reverse for repos re-saved by new versions). Rows in order of likelihood.
RULES: tuple[Rule, ...] = (
    Rule("same name (Llama, Qwen2, Mistral, Gemma, Phi-3 ...)", r"^(.+)$", r"\1"),
    Rule("LLaVA family / Gemma 3 / Mistral 3 / PaliGemma / InternVL text", r"^model\.language_model\.", "language_model.model."),
    Rule("LLaVA family lm_head", r"^lm_head$", "language_model.lm_head"),
    Rule("LLaVA family towers", r"^model\.(vision_tower|multi_modal_projector|vision_model)\.", r"\1."),
    Rule("Qwen2-VL / Qwen2.5-VL text", r"^model\.language_model\.", "model."),
    Rule("Qwen2-VL / Qwen2.5-VL vision", r"^model\.visual\.", "visual."),
    Rule("old in-memory names, new checkpoint (Qwen2-VL)", r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    Rule("old in-memory names, new checkpoint (Qwen2-VL vision)", r"^visual\.", "model.visual."),
    Rule("old in-memory names, new checkpoint (LLaVA)", r"^language_model\.model\.", "model.language_model."),
    Rule("old in-memory names, new checkpoint (LLaVA towers)", r"^(vision_tower|multi_modal_projector|vision_model)\.",
         r"model.\1."),
    Rule("old in-memory names, new checkpoint (LLaVA lm_head)", r"^language_model\.lm_head$", "lm_head"),
    Rule("base_model_prefix stripped on disk (GPT-2 'transformer.')", r"^transformer\.", ""),
    Rule("Mixtral router (transformers v5 mlp.gate, block_sparse_moe.gate on disk)", r"\.mlp\.gate$",
         ".block_sparse_moe.gate"),
)


def parse_map(text: str) -> Rule:
    """A user rule from ``--map 'REGEX=REPLACEMENT'`` (the first '=' splits)."""
    pattern, sep, replacement = text.partition("=")
    if not sep or not pattern:
        raise InputError(f"--map {text!r}: write REGEX=REPLACEMENT, e.g. '^model\\.=language_model.model.'")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InputError(f"--map {text!r}: {pattern!r} is not a valid regex ({exc})") from None
    return Rule(f"user --map {text}", pattern, replacement)


@dataclass(frozen=True)
class Match:
    tensor: str  # base tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
    rule: Rule


def resolve(module: str, weight_map: dict[str, str], *, user_rules: tuple[Rule, ...] = (),
            param: str = "weight") -> Match | None:
    """The base tensor ``<module>.<param>`` for an adapter module, or None when no rule finds one.

    User rules are tried first and, when any of them finds a tensor, the built-in table is not
    consulted. Several distinct tensors is an error: ambiguity is never resolved by guessing.
    """
    for rules in (user_rules, RULES):
        found: dict[str, Rule] = {}
        for rule in rules:
            path = rule.candidate(module)
            if path is not None and f"{path}.{param}" in weight_map:
                found.setdefault(f"{path}.{param}", rule)
        if len(found) > 1:
            raise PlanError(
                f"adapter module {module!r} matches several base tensors "
                f"({', '.join(sorted(found))}); add a --map rule to pick one"
            )
        if found:
            tensor, rule = found.popitem()
            return Match(tensor, rule)
    return None


@dataclass(frozen=True)
class Layout:
    """Layers whose weight is stored transposed, (in, out), decided by the layer kind: the model
    family (config ``model_type``) and the module name. PEFT's saved ``fan_in_fan_out`` is not
    trusted, and shapes cannot tell square layers apart."""

    family: str
    model_types: frozenset[str]
    module: str  # regex searched in the module path

    def applies(self, model_type: str | None, module: str) -> bool:
        return model_type in self.model_types and re.search(self.module, module) is not None


LAYOUTS: tuple[Layout, ...] = (
    Layout("GPT-2 family Conv1D (weight stored in x out)",
           frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}),
           r"(^|\.)(c_attn|q_attn|c_proj|c_fc)$"),
)


def stored_transposed(model_type: str | None, module: str) -> Layout | None:
    return next((layout for layout in LAYOUTS if layout.applies(model_type, module)), None)


VOCAB_TENSORS = r"(embed_tokens|wte|word_embeddings|lm_head)\.weight$"  # tensors with one row per token

# Tied checkpoints store only the input embedding; the output head's name follows from it.
# (embedding tensor pattern, head tensor replacement) -- first match wins.
TIED_HEADS: tuple[tuple[str, str], ...] = (
    (r"^(.*?)model\.(?:language_model\.)?embed_tokens\.weight$", r"\1lm_head.weight"),  # Llama, Qwen, LLaVA ...
    (r"^(?:transformer\.)?wte\.weight$", "lm_head.weight"),  # GPT-2
)


def tied_head(weight_map: dict[str, str]) -> tuple[str, str] | None:
    """(embedding tensor, head tensor name to write) for a tied checkpoint, or None."""
    for pattern, replacement in TIED_HEADS:
        found = [name for name in weight_map if re.match(pattern, name)]
        if len(found) == 1:
            return found[0], re.sub(pattern, replacement, found[0])
    return None


@dataclass(frozen=True)
class Experts:
    """Fused experts in memory (transformers v5 ``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I))
    stored per expert on disk: ``<disk container>.{e}.<gate|up|down>.weight``."""

    family: str
    container: str  # regex on the in-memory experts module path
    disk: str  # its replacement on disk
    gate: str
    up: str
    down: str


EXPERTS: tuple[Experts, ...] = (
    Experts("per-expert gate/up/down_proj (Qwen2-MoE, Qwen3-MoE, OLMoE ...)", r"\.mlp\.experts$", ".mlp.experts",
            "gate_proj", "up_proj", "down_proj"),
    Experts("Mixtral (block_sparse_moe w1/w3/w2)", r"\.mlp\.experts$", ".block_sparse_moe.experts", "w1", "w3", "w2"),
)
