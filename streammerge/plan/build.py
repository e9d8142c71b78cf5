"""The plan: every adapter module mapped to exactly one base tensor, every shape checked.

Built from headers only, before any tensor data is read or any output is written. A plan that
leaves an adapter tensor unmatched, matches it twice or finds a wrong shape raises PlanError.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters.types import LoraAdapter, LoraModule
from ..deltas import MULTIPLICATIVE, method
from ..errors import InputError, PlanError, UnsupportedError
from ..formats.checkpoint import BaseCheckpoint
from ..formats.header import FLOAT_DTYPES, TensorInfo
from .keymap import EXPERTS, VOCAB_TENSORS, Match, Rule, resolve, stored_transposed, tied_head
from .tokenizer import choose_tokenizer
from .quantized import QuantizedBase
from .types import DTYPE_CHOICES, KEEP_FP8, Delta, MergePlan, Quant, Source, TensorPlan, TokenRows

_SHOW = 5  # keys quoted in an error message before "... and N more"


def _out_dtype(info: TensorInfo, target: str | None) -> str:
    return target if target is not None and info.dtype in FLOAT_DTYPES else info.dtype


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _unmatched_error(adapter: LoraAdapter, unmatched: list[str], base: BaseCheckpoint) -> PlanError:
    total = len(adapter.modules)
    cause = (
        "no module matched: the adapter was most likely trained on a different model"
        if len(unmatched) == total
        else f"{total - len(unmatched)} of {total} modules matched: the adapter was likely trained "
        "on a different model or a checkpoint with other names (add --map REGEX=REPLACEMENT)"
    )
    if any(m.endswith("lm_head") for m in unmatched) and "lm_head.weight" not in base.weight_map:
        cause = "lm_head is tied to the embedding in this checkpoint (no lm_head.weight on disk); " + cause
    return PlanError(
        f"adapter {adapter.path}: {len(unmatched)} LoRA module(s) have no tensor in base "
        f"{base.root}: {_listing(unmatched)}; {cause}"
    )


def _method_name(adapter: LoraAdapter, lora: LoraModule, tensor: str, stored_transposed: bool) -> str:
    """The delta registry's name for one module on one tensor: LoRA / DoRA, transposed (``_T``) for
    Conv1D and Embedding layouts; another PEFT method as its module says (not on transposed layouts yet)."""
    if lora.method != "lora":
        if stored_transposed or lora.embedding:
            raise UnsupportedError(f"adapter {adapter.path}: {lora.method} on {tensor}, stored transposed (Conv1D), is "
                                   "not merged by this version")
        return lora.method
    return ("dora" if lora.magnitude_key else "lora") + ("_T" if lora.embedding or stored_transposed else "")


def _replacement_sources(base: BaseCheckpoint, adapters: list[LoraAdapter], user_rules: tuple[Rule, ...],
                         names: dict[str, str], infos: dict[str, TensorInfo], plan_changes: dict[str, Any]) -> dict[str, Source]:
    """Full tensors saved with an adapter, mapped like modules. A vocabulary tensor (embedding or
    head) may come with a new row count: ``infos`` then gets the new shape and the config change."""
    sources: dict[str, Source] = {}
    vocab = _vocab_size(base.config)
    for adapter in adapters:
        for param_path, info in adapter.replacements.items():
            module, _, param = param_path.rpartition(".")
            match = resolve(module, names, user_rules=user_rules, param=param)
            if match is None:
                raise _unmatched_error(adapter, [param_path], base)
            tensor = infos.get(match.tensor) or base.info(match.tensor)
            if info.dtype not in FLOAT_DTYPES:
                raise UnsupportedError(f"adapter {adapter.path}: saved {param_path} is {info.dtype}, not a float weight")
            if info.shape != tensor.shape:
                resized = (len(info.shape) == 2 and len(tensor.shape) == 2 and info.shape[1] == tensor.shape[1]
                           and tensor.shape[0] == vocab and re.search(VOCAB_TENSORS, match.tensor))
                if not resized:
                    raise PlanError(f"adapter {adapter.path}: {param_path} is saved with shape {list(info.shape)} but "
                                    f"{match.tensor} is {list(tensor.shape)} in the base")
                if plan_changes.setdefault("vocab_size", info.shape[0]) != info.shape[0]:
                    raise PlanError(f"adapter {adapter.path}: {param_path} resizes the vocabulary to {info.shape[0]} "
                                    f"rows but another tensor to {plan_changes['vocab_size']}")
                infos[match.tensor] = dataclasses.replace(tensor, shape=info.shape,
                                                          end=tensor.begin + info.numel * tensor.itemsize)
                plan_changes.setdefault("_tokenizer_from", str(adapter.path))
            if match.tensor in sources:
                raise PlanError(f"two adapters both replace {match.tensor}; merge them one at a time")
            assert adapter._header is not None
            sources[match.tensor] = Source(adapter.weights_path, adapter._header.data_start, info)
    if "vocab_size" in plan_changes:  # every vocabulary tensor must follow, or the model is inconsistent
        stale = [n for n in names if re.search(VOCAB_TENSORS, n) and n not in sources
                 and (infos.get(n) or base.info(n)).shape[0] != plan_changes["vocab_size"]]
        if stale:
            raise PlanError(f"the adapter resizes the vocabulary to {plan_changes['vocab_size']} rows but "
                            f"{', '.join(stale)} keeps {vocab}: the adapter must save it too (modules_to_save)")
    return sources


def _token_rows(base: BaseCheckpoint, adapters: list[LoraAdapter], user_rules: tuple[Rule, ...],
                names: dict[str, str], infos: dict[str, TensorInfo]) -> dict[str, TokenRows]:
    rows: dict[str, TokenRows] = {}
    for adapter in adapters:
        for module, (ids, info) in adapter.token_rows.items():
            match = resolve(module, names, user_rules=user_rules)
            if match is None:
                raise _unmatched_error(adapter, [module], base)
            tensor = infos.get(match.tensor) or base.info(match.tensor)
            if len(tensor.shape) != 2 or tensor.shape[1] != info.shape[1] or max(ids) >= tensor.shape[0]:
                raise PlanError(f"adapter {adapter.path}: token rows {list(info.shape)} for ids up to {max(ids)} do not "
                                f"fit {match.tensor} {list(tensor.shape)}")
            if match.tensor in rows:
                raise PlanError(f"two adapters both replace token rows of {match.tensor}; merge them one at a time")
            rows[match.tensor] = TokenRows(adapter, tuple(ids), info.name)
    return rows


def _refuse_conv(adapter: LoraAdapter, lora: LoraModule, tensor: str, info: TensorInfo) -> None:
    if len(info.shape) == lora.conv_dims:
        raise UnsupportedError(f"adapter {adapter.path}: {lora.module} is LoRA on a convolution ({tensor} is "
                               f"{list(info.shape)}): LoRA on convolution layers (Conv1d/2d/3d, grouped or not) is "
                               "not merged by this version")
    raise InputError(f"{adapter.weights_path}: module {lora.module!r} has {lora.conv_dims}-D LoRA factors but "
                     f"{tensor} is {list(info.shape)}; the adapter files are inconsistent")


def _expert_deltas(adapter: LoraAdapter, lora: LoraModule, names: dict[str, str], user_rules: tuple[Rule, ...],
                   base: BaseCheckpoint) -> list[tuple[str, Delta]]:
    """A fused-experts factor pair -> one delta per expert tensor on disk (gate_up split in two).
    Which parameter it is (gate_up or down) is told by the shapes; which layout, by the names on disk."""
    a, b = adapter.tensors[lora.a_key].shape, adapter.tensors[lora.b_key].shape
    found = []
    for layout in EXPERTS:
        disk = re.sub(layout.container, layout.disk, lora.container)
        parts = {part: resolve(f"{disk}.0.{getattr(layout, part)}", names, user_rules=user_rules)
                 for part in ("gate", "up", "down")}
        if all(parts.values()):
            found.append((layout, disk, {k: base.info(m.tensor).shape for k, m in parts.items()}))
    if len(found) != 1:
        raise PlanError(f"adapter {adapter.path}: fused experts {lora.container!r} match "
                        f"{'no' if not found else 'several'} per-expert layouts in base {base.root}; add --map rules")
    layout, disk, shapes = found[0]
    gate, down = shapes["gate"], shapes["down"]
    if b[0] == 2 * gate[0] and a[1] == gate[1]:  # gate_up_proj: rows [:I] -> gate, [I:] -> up
        split, param = [(layout.gate, (0, gate[0])), (layout.up, (gate[0], 2 * gate[0]))], "gate_up_proj"
    elif (b[0], a[1]) == tuple(down):
        split, param = [(layout.down, None)], "down_proj"
    else:
        raise PlanError(f"adapter {adapter.path}: {lora.module}: factors {list(a)} / {list(b)} fit neither "
                        f"gate_up {[2 * gate[0], gate[1]]} nor down {list(down)} of {disk}")
    lora = _expert_rank(adapter, lora, param)
    out = []
    for e in range(lora.experts):
        for name, rows in split:
            match = resolve(f"{disk}.{e}.{name}", names, user_rules=user_rules)
            if match is None:
                raise PlanError(f"adapter {adapter.path}: {lora.module} has {lora.experts} experts but base "
                                f"{base.root} has no {disk}.{e}.{name}")
            out.append((match.tensor, Delta(adapter, lora, f"{match.rule.family}; {layout.family}", "lora_expert",
                                             expert=e, rows=rows)))
    return out


def _expert_rank(adapter: LoraAdapter, lora: LoraModule, param: str) -> LoraModule:
    """The factors' r, alpha and scaling as PEFT gives them to ``param`` (its rank_pattern is matched
    against "<container>.<param>", not the module path), and so their expert count."""
    rows = adapter.tensors[lora.a_key].shape[0]
    r, alpha, scaling = next((v[1:] for v in lora.param_ranks if v[0] == param), (lora.r, lora.lora_alpha,
                                                                                  lora.scaling))
    if rows % r:
        raise InputError(f"{adapter.weights_path}: {lora.module} ({param}) has lora_A with {rows} rows, not a "
                         f"multiple of its r={r}; the adapter files are inconsistent")
    return dataclasses.replace(lora, r=r, lora_alpha=alpha, scaling=scaling, experts=rows // r)


def _vocab_size(config: dict[str, Any]) -> int | None:
    text = config.get("text_config")
    for cfg in ((text if isinstance(text, dict) else {}), config):
        if isinstance(cfg.get("vocab_size"), int):
            return cfg["vocab_size"]
    return None


@dataclass(frozen=True)
class _Lookup:
    """The names an adapter may map to: the base's, plus a tied head; and headers that differ from
    the base's (the tied head, resized vocabulary tensors)."""

    base: BaseCheckpoint
    names: dict[str, str]
    infos: dict[str, TensorInfo]
    user_rules: tuple[Rule, ...]
    quantized: frozenset[str] = frozenset()  # base weights a codec dequantizes (their stored dtype is no float)

    def resolve(self, module: str, param: str = "weight") -> Match | None:
        return resolve(module, self.names, user_rules=self.user_rules, param=param)

    def info(self, tensor: str) -> TensorInfo:
        return self.infos.get(tensor) or self.base.info(tensor)


def _adapter_deltas(adapter: LoraAdapter, look: _Lookup, deltas: dict[str, list[Delta]]) -> None:
    """Map every module of one adapter (exactly once each) and check every shape; add its deltas."""
    base = look.base
    unmatched, claimed, bad = [], {}, []
    for module, lora in adapter.modules.items():
        if lora.experts:
            for tensor, delta in _expert_deltas(adapter, lora, look.names, look.user_rules, base):
                deltas.setdefault(tensor, []).append(delta)
            continue
        match = look.resolve(module, param=lora.target_param)
        if match is None:
            unmatched.append(module)
            continue
        if match.tensor in claimed:
            raise PlanError(
                f"adapter {adapter.path}: modules {claimed[match.tensor]!r} and {module!r} both "
                f"map to {match.tensor}; refusing to merge one tensor twice (check --map rules)"
            )
        claimed[match.tensor] = module
        info = look.info(match.tensor)
        if lora.conv_dims:
            _refuse_conv(adapter, lora, match.tensor, info)
        layout = stored_transposed(base.model_type, match.tensor.removesuffix(".weight"))
        rule = match.rule.family + (f"; {layout.family}" if layout else "")
        delta = Delta(adapter, lora, rule, _method_name(adapter, lora, match.tensor, layout is not None),
                      shape=tuple(info.shape))
        problem = method(delta.method).check(delta, match.tensor, info)
        if problem is None and info.dtype not in FLOAT_DTYPES and match.tensor not in look.quantized:
            problem = f"{match.tensor} is {info.dtype}; only {'/'.join(FLOAT_DTYPES)} weights can be merged"
        if problem:
            bad.append(problem)
        deltas.setdefault(match.tensor, []).append(delta)
        if lora.bias_key:  # lora_bias: the layer's bias takes scale * lora_B.bias
            bad.extend(_bias_delta(adapter, module, lora, look, deltas))
        if lora.bias_method and (bias := look.resolve(module, param="bias")) is not None:
            scaled = Delta(adapter, lora, bias.rule.family, lora.bias_method, shape=tuple(info.shape),
                           companion=_source(base, match.tensor))  # IA3's output side, GLoRA's: the bias too
            deltas.setdefault(bias.tensor, []).append(scaled)
            bad.extend(p for p in [method(scaled.method).check(scaled, bias.tensor, look.info(bias.tensor))] if p)
    if unmatched:
        raise _unmatched_error(adapter, unmatched, base)
    if bad:
        raise PlanError(
            f"adapter {adapter.path}: shapes do not fit base {base.root}: {_listing(bad)}; "
            "the adapter was trained on a model of another size"
        )


def _source(base: BaseCheckpoint, tensor: str) -> Source | None:
    """Where a base tensor's bytes are (None for a tensor the base does not hold, e.g. a tied head)."""
    if tensor not in base.weight_map:
        return None
    header = base.shards[base.weight_map[tensor]]
    return Source(header.path, header.data_start, header.tensors[tensor])


def _bias_delta(adapter: LoraAdapter, module: str, lora: LoraModule, look: _Lookup,
                deltas: dict[str, list[Delta]]) -> list[str]:
    bias = look.resolve(module, param="bias")
    if bias is None:
        raise UnsupportedError(f"adapter {adapter.path}: {module} has lora_bias but the base layer has no "
                               "bias tensor to merge it into")
    deltas.setdefault(bias.tensor, []).append(Delta(adapter, lora, bias.rule.family, "lora_bias"))
    have, want = look.info(bias.tensor).shape, adapter.tensors[lora.bias_key].shape
    return [] if have == want else [f"{module}: lora_B.bias {list(want)} but {bias.tensor} is {list(have)}"]


def _matches(patterns: tuple[str, ...], names: tuple[str, ...]) -> bool:
    return any(re.search(p, n) for p in patterns for n in names)


def _filter(deltas: dict[str, list[Delta]], sources: dict[str, Source], tokens: dict[str, TokenRows],
            include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """--include / --exclude over base tensor names and adapter modules: what they leave out is
    removed from the plan and listed (never dropped silently)."""
    if not include and not exclude:
        return []

    def keep(*names: str) -> bool:
        return (not include or _matches(include, names)) and not _matches(exclude, names)

    excluded: list[str] = []
    for tensor, ds in list(deltas.items()):
        kept = [d for d in ds if keep(tensor, d.lora.module)]
        excluded += [f"{d.adapter.label}: {d.lora.module} -> {tensor}" for d in ds if d not in kept]
        if kept:
            deltas[tensor] = kept
        else:
            del deltas[tensor]
    for table, key in ((sources, lambda v: v.info.name), (tokens, lambda v: v.key)):
        for tensor, value in list(table.items()):
            if not keep(tensor, key(value)):
                excluded.append(f"{key(value)} -> {tensor} (replacement)")
                del table[tensor]
    return excluded


def _layout(base: BaseCheckpoint, names: dict[str, str], infos: dict[str, TensorInfo],
            out_dtype: Callable[[str, TensorInfo], str], deltas: dict[str, list[Delta]], sources: dict[str, Source],
            tokens: dict[str, TokenRows], quant: dict[str, Quant], dropped: set[str]) -> dict[str, list[TensorPlan]]:
    """Each output shard's tensors in the base's data order (tensors a shard holds but the index does
    not list are left out, as loaders ignore them; so are the side tensors of a dequantized scheme;
    a weight stored under another name, e.g. GPTQ's ``qweight``, is written under its own)."""
    renamed = {q.stored: n for n, q in quant.items() if q.stored}
    return {shard: [TensorPlan(name, shard, infos.get(name, info), out_dtype(name, info), deltas.get(name, []),
                               sources.get(name), tokens.get(name), quant.get(name))
                    for name, info in ((renamed.get(n, n), i) for n, i in header.tensors.items())
                    if names.get(name) == shard and name not in dropped]
            for shard, header in base.shards.items()}


def build_plan(
    base: BaseCheckpoint,
    adapters: list[LoraAdapter],
    *,
    dtype: str = "auto",
    user_rules: tuple[Rule, ...] = (),
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    tokenizer: Path | None = None,
) -> MergePlan:
    """Map, check and lay out the whole merge. Reads headers only."""
    target = None if dtype in ("auto", KEEP_FP8) else DTYPE_CHOICES[dtype]
    qbase = QuantizedBase.of(base, target, keep=dtype == KEEP_FP8)
    quant = qbase.weights
    # A tied checkpoint has no output head on disk; an adapter may still target it (see _untie).
    tie = tied_head(base.weight_map) if base.ties_embeddings else None
    tie = tie if tie and tie[1] not in base.weight_map else None
    names = dict(base.weight_map, **({tie[1]: base.weight_map[tie[0]]} if tie else {}))
    infos = {tie[1]: dataclasses.replace(base.info(tie[0]), name=tie[1])} if tie else {}
    qbase.register(names, infos)
    changes: dict[str, Any] = {}
    sources = _replacement_sources(base, adapters, user_rules, names, infos, changes)
    look = _Lookup(base, names, infos, user_rules, frozenset(quant))
    deltas: dict[str, list[Delta]] = {}
    for adapter in adapters:
        _adapter_deltas(adapter, look, deltas)
    tokens = _token_rows(base, adapters, user_rules, names, infos)
    resized = [t for t in sources if "vocab_size" in changes and infos.get(t) is not None
               and infos[t].shape[0] == changes["vocab_size"]]
    excluded = _filter(deltas, sources, tokens, include, exclude)
    if any(t not in sources for t in resized):
        raise PlanError(f"--include/--exclude leave out {', '.join(t for t in resized if t not in sources)}, which the "
                        "adapter resizes; keep every resized vocabulary tensor in the merge")
    for tensor, ds in deltas.items():
        if len(ds) > 1 and any(d.lora.magnitude_key for d in ds):
            raise UnsupportedError(f"{tensor}: a DoRA adapter cannot be merged together with another adapter "
                                   "on the same weight (DoRA rescales the sum); merge them one after another")
    dropped = qbase.dropped
    shards = _layout(base, names, infos, lambda n, info: qbase.out_dtype(info) if n in quant else _out_dtype(info, target),
                     deltas, sources, tokens, quant, dropped)
    resized_by = changes.pop("_tokenizer_from", None)
    tokenizer_from, why = choose_tokenizer(base.root, adapters, explicit=tokenizer,
                                           resized_by=Path(resized_by) if resized_by else None,
                                           vocab_size=changes.get("vocab_size"))
    plan = MergePlan(base, adapters, shards, target, changes, tokenizer_from, why, excluded, dropped,
                     qbase.dequantized, qbase.dequant_to if qbase.dequantized else target, notes=_order_notes(deltas))
    qbase.finish(plan)
    if tie and (deltas.get(tie[0]) or deltas.get(tie[1])):
        _untie(plan, *tie, infos[tie[1]], deltas.get(tie[1], []), sources.get(tie[1]) or sources.get(tie[0]))
    return plan


def _order_notes(deltas: dict[str, list[Delta]]) -> list[str]:
    """Where a multiplicative method (IA3) meets other deltas on one weight, the adapters' order matters: say so."""
    order = sorted(t for t, ds in deltas.items() if len(ds) > 1 and any(d.method in MULTIPLICATIVE for d in ds))
    if not order:
        return []
    return [f"{len(order)} weight(s) take a multiplicative method (IA3) and other deltas: each adapter applies to "
            f"what the ones before it made, in the order given (e.g. {order[0]}: "
            f"{' then '.join(d.method for d in deltas[order[0]])})"]


def _untie(plan: MergePlan, embedding: str, head: str, info: TensorInfo, head_deltas: list[Delta],
           source: Source | None) -> None:
    """The merge makes the input embedding and the output head differ: write the head as its own
    tensor (the tied weight plus the head's own deltas, as the PEFT model computes its logits),
    beside the embedding in its shard, and switch tie_word_embeddings off."""
    shard = plan.base.weight_map[embedding]
    tensors = plan.shards[shard]
    at = next(i for i, t in enumerate(tensors) if t.name == embedding)
    tensors.insert(at + 1, TensorPlan(head, shard, info, tensors[at].out_dtype, head_deltas, source))
    plan.config_changes["tie_word_embeddings"] = False

