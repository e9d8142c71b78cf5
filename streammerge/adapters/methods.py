"""PEFT adapters of methods other than LoRA, read into the same ``LoraAdapter``: one module per
adapted layer, with its method (a row of the delta registry) and its tensors by role. The saved
tensors decide the layout, not the config (e.g. the shape of IA3's vector says which side it scales).

- IA3: ``<m>.ia3_l`` (out, 1) scales W's rows (and the layer's bias); (1, in) scales its columns
  (``feedforward_modules``). An untrained IA3 is all ones.
- LoHa: ``<m>.hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``, ``hada_w2_b``:
  delta = alpha / r * (w1a @ w1b) * (w2a @ w2b) (Hadamard product).
- LoKr: ``<m>.lokr_w1`` (a1, a2) or ``lokr_w1_a`` (a1, r) @ ``lokr_w1_b`` (r, a2); ``lokr_w2`` (b1, b2)
  or ``lokr_w2_a`` @ ``lokr_w2_b``: delta = alpha / r * kron(w1, w2), (a1 * b1, a2 * b2).
- VeRA: ``<m>.vera_lambda_b`` (out,), ``vera_lambda_d`` (r,) and the projections every module shares,
  ``base_model.vera_A`` (r, largest in) and ``base_model.vera_B`` (largest out, r):
  delta = (lambda_b * B[:out]) @ (lambda_d * A[:, :in]) (no alpha).
- AdaLoRA: ``<m>.lora_A`` (k, in), ``lora_E`` (k, 1), ``lora_B`` (out, k): delta = B (A * E) * lora_alpha
  / (init_r + 1e-5) (see ``_adalora``); a module pruned to rank 0 changes nothing and is left out.
- RoAd: ``<m>.road_theta`` and ``road_alpha``: rotations of pairs of output rows (``deltas/road.py``).
- MiSS: ``<m>.miss_block``, default, ``mini`` or ``bat`` (``deltas/miss.py``).
- C3A: ``<m>.c3a_kernel`` (out/b, in/b, b): a block-circulant delta over in_features.
- DeLoRA: ``<m>.delora_A``, ``delora_B``, ``delora_lambda``, ``delora_w_norm``; HiRA: ``<m>.hira_A``,
  ``hira_B`` (``deltas/additive.py``).
- PVeRA: VeRA's tensors (``pvera_*``) with a mean and a log-variance per rank: merged on the means.
- BEFT: ``<m>.beft_bias``: added to the layer's bias.
- GraLoRA: ``<m>.gralora_A`` (k, in/k, r), ``gralora_B`` (k, r, out/k), and a hybrid LoRA.
- RandLoRA: ``<m>.randlora_lambda``, ``randlora_gamma`` and the shared random bases.
- SHiRA: ``<m>.shira_indices`` (2, n) (rows; columns) and ``shira_weight`` (n,): a sparse delta.
- UniLoRA: ``<m>.unilora_indices_A/B`` and ``unilora_scales_A/B`` (save_indices) and the shared
  ``base_model.unilora_theta_d``.
- Supertuning: ``<m>.supertuning_indices`` (flat), ``supertuning_values`` and, with r, a LoRA.
- VB-LoRA: ``<m>.vblora_logits_A/B`` (or their ``_topk_indices`` / ``_topk_weights``) and the shared
  ``base_model.vblora_vector_bank``.
- BOFT: ``<m>.boft_R`` (1, blocks, b, b) and ``boft_s`` (out, 1) (``deltas/boft.py``).
- HRA: ``<m>.hra_u`` (in, r): Householder reflections of the input side (``deltas/hra.py``).
- LN tuning: ``<m>.ln_tuning_layers.weight`` (and ``.bias``): the norm's trained tensors, which replace
  the base's (as modules_to_save do).
- OFT: ``<m>.oft_R.weight`` (blocks, b(b-1)/2): a block-diagonal rotation of the input side
  (``deltas/oft.py``); the rotation's parameters (Cayley-Neumann terms, coft, block_share) from the config.
r and alpha per module as PEFT reads them (``rank_pattern`` / ``alpha_pattern``). The convolution
forms (``hada_t1``/``hada_t2``, ``lokr_t2``) and Conv1D layouts (``fan_in_fan_out``) are refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, PlanError, UnsupportedError
from ..formats.header import TensorInfo
from .peft import BASE_LAYER_SUFFIX, EMBEDDING_LAYERS, PEFT_PREFIX, _index_tensors, _pattern_value, _saved_module
from .tinylora import assign_vectors
from .types import LoraAdapter, LoraModule
from .weightmethods import MAX_DEPTH, SHARED_BY_MODULE, deft, fourierft, glora, peanut

# peft_type -> saved tensor suffix -> role
ROLES: dict[str, dict[str, str]] = {
    "IA3": {"ia3_l": "l"},
    "LOHA": {"hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
             "hada_t1": "t1", "hada_t2": "t2"},
    "LOKR": {"lokr_w1": "w1", "lokr_w1_a": "w1a", "lokr_w1_b": "w1b", "lokr_w2": "w2", "lokr_w2_a": "w2a",
             "lokr_w2_b": "w2b", "lokr_t2": "t2"},
    "VERA": {"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"},
    "ADALORA": {"lora_A": "A", "lora_B": "B", "lora_E": "E"},
    "OFT": {"oft_R.weight": "R"},
    "LN_TUNING": {},
    "HRA": {"hra_u": "u"},
    "SHIRA": {"shira_indices": "indices", "shira_weight": "values"},
    "ROAD": {"road_theta": "theta", "road_alpha": "alpha"},
    "MISS": {"miss_block": "B"},
    "C3A": {"c3a_kernel": "kernel"},
    "DELORA": {"delora_A": "A", "delora_B": "B", "delora_lambda": "lambda", "delora_w_norm": "w_norm"},
    "HIRA": {"hira_A": "A", "hira_B": "B"},
    "PVERA": {"pvera_lambda_b": "lambda_b", "pvera_lambda_d": "lambda_d"},
    "BEFT": {"beft_bias": "bias"},
    "RANDLORA": {"randlora_lambda": "lambda", "randlora_gamma": "gamma", "randlora_A": "A", "randlora_B": "B"},
    "GRALORA": {"gralora_A": "A", "gralora_B": "B", "gralora_A_general.weight": "A_general",
                "gralora_B_general.weight": "B_general"},
    "BOFT": {"boft_R": "R", "boft_s": "s"},
    "VBLORA": {"vblora_logits_A": "logits_A", "vblora_logits_B": "logits_B", "vblora_logits_A_topk_indices": "A_idx",
               "vblora_logits_A_topk_weights": "A_w", "vblora_logits_B_topk_indices": "B_idx",
               "vblora_logits_B_topk_weights": "B_w"},
    "SUPERTUNING": {"supertuning_indices": "flat", "supertuning_values": "values", "supertuning_lora_A.weight": "A",
                    "supertuning_lora_B.weight": "B"},
    "UNILORA": {"unilora_indices_A": "idx_A", "unilora_indices_B": "idx_B", "unilora_scales_A": "scales_A",
                "unilora_scales_B": "scales_B"},
    "DEFT": {"deft_P": "P", "deft_R": "R"},
    "PEANUT": {"peanut_A.weight": "A", "peanut_B.weight": "B",
               **{f"peanut_{side}oders.{i}.weight": f"{side}{i}" for side in ("enc", "dec") for i in range(MAX_DEPTH)}},
    "OSF": {"osf_svd_params.U_low": "U", "osf_svd_params.S_low": "S", "osf_svd_params.V_low": "V"},
    "FROD": {"frod_lambda_l": "lambda_l", "frod_lambda_s_values": "values"},
    "FOURIERFT": {"fourierft_spectrum": "spectrum"},
    "WAVEFT": {"waveft_spectrum": "spectrum"},
    "TINYLORA": {"tinylora_A": "A", "tinylora_B": "B", "tinylora_P": "P"},
    "GLORA": {f"glora_{x}.{saved}": f"{x}_{role}" for x in "ABCDE" for saved, role in
              (("Xd", "d"), ("Xu", "u"), ("X", "x"), ("zeros", "0"))},
}
# peft_type -> the infix of saved layers that replace the base's ("<m>.ln_tuning_layers.weight" -> "<m>.weight")
REPLACING = {"LN_TUNING": ".ln_tuning_layers."}
# peft_type -> tensors shared by every module (saved once) -> role
SHARED: dict[str, dict[str, str]] = {"VERA": {"base_model.vera_A": "A", "base_model.vera_B": "B"},
                                     "PVERA": {"base_model.pvera_A": "A", "base_model.pvera_B": "B"},
                                     "RANDLORA": {"base_model.randlora_A": "A", "base_model.randlora_B": "B"},
                                     "VBLORA": {"base_model.vblora_vector_bank": "bank"},
                                     "UNILORA": {"base_model.unilora_theta_d": "theta"}}
CONVOLUTION_ROLES = {"t1", "t2"}



def _scaling(config: dict[str, Any], module: str, where: Path) -> tuple[int, float, float]:
    """r, alpha and alpha / r of one LyCORIS module (rank_pattern / alpha_pattern as PEFT matches them)."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("alpha"))
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)):
        raise InputError(f"{where}: module {module!r} needs an integer r > 0 and a number alpha, got r={r!r}, "
                         f"alpha={alpha!r}")
    return r, float(alpha), float(alpha) / r


@dataclass(frozen=True)
class Spec:
    """One saved module of a method: what its builder reads."""

    peft_type: str
    config: dict[str, Any]
    module: str
    roles: dict[str, TensorInfo]
    keys: tuple[tuple[str, str], ...]
    where: Path

    def needs(self, *groups: set[str]) -> None:
        """Each group's roles present (one of a group's alternatives, for LoKr's whole-or-halves)."""
        for group in groups:
            if not group & set(self.roles):
                raise InputError(f"{self.where}: {self.module!r} has {sorted(self.roles)}; {self.peft_type} needs "
                                 f"{sorted(group)}")

    def plain(self, r: int = 0, **fields: Any) -> LoraModule:
        """The module with its method named after its peft_type, no scaling (1.0) unless given."""
        return LoraModule(self.module, "", "", r, fields.pop("lora_alpha", 1.0), fields.pop("scaling", 1.0),
                          method=fields.pop("method", self.peft_type.lower()), keys=self.keys, **fields)


def _lycoris(spec: Spec) -> LoraModule:
    """LoHa and LoKr: r and alpha per module (patterns), scaling alpha / r."""
    if spec.peft_type == "LOHA":
        spec.needs(*({x} for x in ("w1a", "w1b", "w2a", "w2b")))
    else:
        spec.needs({"w1", "w1a"}, {"w2", "w2a"})
        for name in ("w1", "w2"):
            if not spec.roles.keys() & {name} and {name + "a", name + "b"} - spec.roles.keys():
                raise InputError(f"{spec.where}: {spec.module!r} has {sorted(spec.roles)}; LoKr needs lokr_{name} or "
                                 f"both lokr_{name}_a and lokr_{name}_b")
    r, alpha, scaling = _scaling(spec.config, spec.module, spec.where)
    return spec.plain(r, lora_alpha=alpha, scaling=scaling)


def _ia3(spec: Spec) -> LoraModule:
    """IA3: the saved vector's shape says the side: (out, 1) rows and the bias, (1, in) columns."""
    shape = spec.roles["l"].shape
    if len(shape) != 2 or 1 not in shape:
        raise InputError(f"{spec.where}: {spec.module!r} has ia3_l {list(shape)}; expected [out, 1] or [1, in]")
    rows = shape[1] == 1 and shape[0] != 1
    return spec.plain(method="ia3_rows" if rows else "ia3_columns", bias_method="ia3_bias" if rows else None)


def _vera(spec: Spec) -> LoraModule:
    spec.needs({"lambda_b"}, {"lambda_d"}, {"A"}, {"B"})
    return spec.plain(spec.roles["lambda_d"].shape[0])


def _road(spec: Spec) -> LoraModule:
    """RoAd: pairs of output rows in groups: the chunks hold whole groups."""
    group = spec.config.get("group_size")
    if spec.config.get("variant") not in ("road_1", "road_2", "road_4") or not isinstance(group, int) or group < 2:
        raise UnsupportedError(f"{spec.where}: RoAd variant {spec.config.get('variant')!r}, group_size {group!r} is not "
                               "read by this version (road_1, road_2, road_4 with an even group size are)")
    return spec.plain(row_group=group)


def _miss(spec: Spec) -> LoraModule:
    if spec.config.get("init_weights", True) not in (True, False, "bat", "mini"):
        raise UnsupportedError(f"{spec.where}: MiSS init_weights {spec.config.get('init_weights')!r} is not read by this "
                               "version")
    return spec.plain(spec.roles["B"].shape[-1])


def _randlora(spec: Spec) -> LoraModule:
    """RandLoRA: scaling randlora_alpha / r."""
    spec.needs({"lambda"}, {"gamma"}, {"A"}, {"B"})
    r, alpha = spec.config.get("r"), spec.config.get("randlora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise InputError(f"{spec.where}: RandLoRA needs an integer r and a number randlora_alpha, got r={r!r}, "
                         f"randlora_alpha={alpha!r}")
    return spec.plain(r, lora_alpha=float(alpha), scaling=float(alpha) / r)


def _gralora(spec: Spec) -> LoraModule:
    """GraLoRA: scaling alpha / (r + hybrid_r), both ranks from the saved shapes."""
    spec.needs({"A"}, {"B"})
    r = spec.roles["A"].shape[-1]
    hybrid = spec.roles["A_general"].shape[0] if "A_general" in spec.roles else 0
    alpha = spec.config.get("alpha")
    if not isinstance(alpha, (int, float)) or r % max(1, spec.roles["A"].shape[0]):
        raise InputError(f"{spec.where}: GraLoRA {spec.module!r} needs a number alpha and r divisible by gralora_k")
    return spec.plain(r, lora_alpha=float(alpha), scaling=float(alpha) / (r + hybrid))


def _rank_of(role: str) -> Callable[[Spec], LoraModule]:
    """Methods with no scaling of their own (it is in their delta, or there is none): r for the plan's listing."""
    return lambda spec: spec.plain(spec.roles[role].shape[0] if role else 0)


# peft_type -> how one of its saved modules becomes a LoraModule (a new method is a row here)
BUILDERS: dict[str, Callable[[Spec], LoraModule]] = {
    "IA3": _ia3, "LOHA": _lycoris, "LOKR": _lycoris, "VERA": _vera, "PVERA": _vera, "ROAD": _road, "MISS": _miss,
    "RANDLORA": _randlora, "GRALORA": _gralora, "ADALORA": lambda spec: _adalora(spec.config, spec.module, spec.roles, spec.keys, spec.where),
    "OFT": _rank_of("R"), "HRA": lambda spec: spec.plain(spec.roles["u"].shape[-1]), "DELORA": _rank_of("A"),
    "HIRA": _rank_of("A"), "SHIRA": _rank_of(""), "C3A": _rank_of(""),
    "BEFT": lambda spec: spec.plain(target_param="bias"),  # the layer's bias, not its weight
    "BOFT": lambda spec: _boft(spec),
    "VBLORA": lambda spec: _vblora(spec),
    "SUPERTUNING": lambda spec: _supertuning(spec),
    "UNILORA": lambda spec: _unilora(spec),
    "FOURIERFT": lambda spec: fourierft(spec),
    "WAVEFT": lambda spec: fourierft(spec),
    "TINYLORA": lambda spec: (spec.needs({"A"}, {"B"}, {"P"}), spec.plain(spec.roles["A"].shape[0]))[1],
    "GLORA": lambda spec: glora(spec),
    "DEFT": lambda spec: deft(spec),
    "PEANUT": lambda spec: peanut(spec),
    "OSF": lambda spec: (spec.needs({"U"}, {"S"}, {"V"}), spec.plain(spec.roles["U"].shape[1]))[1],
    "FROD": lambda spec: (spec.needs({"lambda_l"}, {"values"}, {"V"}, {"indices"}, {"size"}),
                          spec.plain(spec.roles["V"].shape[0]))[1],
}



def _unilora(spec: Spec) -> LoraModule:
    """UniLoRA with its index maps saved (save_indices); without them PEFT draws them at random."""
    if not {"idx_A", "idx_B", "scales_A", "scales_B"} <= set(spec.roles):
        raise UnsupportedError(f"{spec.where}: UniLoRA {spec.module!r} saved without its index maps (save_indices="
                               "false: PEFT draws them again, one stream over all modules in the model's module order, "
                               "which the adapter does not record); re-save it with save_indices=True")
    spec.needs({"theta"})
    return spec.plain(spec.roles["idx_A"].shape[0])


def _supertuning(spec: Spec) -> LoraModule:
    """Supertuning: its sparse values (indices saved: save_precomputed_indices) and, with r, a LoRA."""
    if "flat" not in spec.roles:
        raise UnsupportedError(f"{spec.where}: supertuning {spec.module!r} saved without its indices "
                               "(save_precomputed_indices=false: PEFT recomputes them from the base weights); "
                               "re-save it with save_precomputed_indices=True")
    spec.needs({"values"})
    if "A" not in spec.roles:
        return spec.plain()
    spec.needs({"B"})
    r, alpha = spec.roles["A"].shape[0], spec.config.get("lora_alpha")
    alpha = float(alpha) if isinstance(alpha, (int, float)) else float(r)
    return spec.plain(r, lora_alpha=alpha, scaling=alpha / r)


def _vblora(spec: Spec) -> LoraModule:
    """VB-LoRA, saved with its full logits or only their top-k (indices and k - 1 weights)."""
    spec.needs({"bank"}, {"logits_A", "A_idx"}, {"logits_B", "B_idx"})
    if not isinstance(spec.config.get("topk"), int) or spec.config["topk"] < 1:
        raise InputError(f"{spec.where}: VB-LoRA needs an integer topk, got {spec.config.get('topk')!r}")
    side = spec.roles.get("logits_A") or spec.roles["A_idx"]
    return spec.plain(side.shape[0])


def _boft(spec: Spec) -> LoraModule:
    spec.needs({"R"}, {"s"})
    shape = spec.roles["R"].shape
    if len(shape) != 4:
        raise InputError(f"{spec.where}: BOFT {spec.module!r} has boft_R {list(shape)}; expected (factors, blocks, b, b)")
    return spec.plain(shape[1])


def _module(peft_type: str, config: dict[str, Any], module: str, roles: dict[str, TensorInfo],
            where: Path) -> LoraModule:
    if CONVOLUTION_ROLES & set(roles):
        raise UnsupportedError(f"{where}: {module!r} holds {peft_type}'s convolution (CP) factors; streammerge "
                               "merges its Linear form only")
    keys = tuple(sorted((role, info.name) for role, info in roles.items()))
    return BUILDERS[peft_type](Spec(peft_type, config, module, roles, keys, where))


def _adalora(config: dict[str, Any], module: str, roles: dict[str, TensorInfo], keys: tuple[tuple[str, str], ...],
             where: Path) -> LoraModule:
    """AdaLoRA's SVD form, W + B (A * E) * scaling / (ranknum + 1e-5), as PEFT loads it: the kept rank
    k from the saved shapes (A (k, in), E (k, 1), B (out, k); pruned by rank_pattern, possibly 0),
    scaling = lora_alpha (or k when lora_alpha is 0) and ranknum = init_r, the rank training began
    with (PEFT keeps it when it prunes), not k."""
    if {"A", "B", "E"} - set(roles):
        raise InputError(f"{where}: {module!r} has {sorted(roles)}; AdaLoRA needs lora_A, lora_B and lora_E")
    a, b, e = roles["A"].shape, roles["B"].shape, roles["E"].shape
    kept, init_r, alpha = (a[0] if len(a) == 2 else -1), config.get("init_r"), config.get("lora_alpha", 8)
    if len(b) != 2 or b[1] != kept or e != (kept, 1) or not isinstance(init_r, int) or isinstance(init_r, bool) \
            or not 0 <= kept <= init_r or not isinstance(alpha, (int, float)):
        raise InputError(f"{where}: AdaLoRA {module!r} has lora_A {list(a)}, lora_B {list(b)}, lora_E {list(e)} with "
                         f"init_r={init_r!r}, lora_alpha={alpha!r}; expected [k, in], [out, k], [k, 1], k <= init_r")
    scaling = (float(alpha) if alpha > 0 else float(kept)) / (init_r + 1e-5)
    return LoraModule(module, "", "", kept, float(alpha), scaling, method="adalora", keys=keys)


def _check_oft(config: dict[str, Any], where: Path, weight: float) -> None:
    """OFT as PEFT >= 0.18 saves it (older adapters use another parameterisation PEFT itself refuses)."""
    version = str(config.get("peft_version") or "0").partition("@")[0]
    if "oft_block_size" not in config or (config.get("use_cayley_neumann", True)
                                          and tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (0, 18)):
        raise UnsupportedError(f"{where}: an OFT adapter saved by PEFT before 0.18 (peft_version {version!r}) uses an "
                               "older parameterisation; re-train it with a current PEFT, as PEFT itself asks")
    if weight != 1:
        raise UnsupportedError(f"{where}: an OFT rotation cannot be weighted ({weight} given); merge it with weight 1")


def _shared_of(by_module: tuple[str, Callable[[str], dict[str, str]]] | None, module: str,
               tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The shared tensors of ``module``'s category (FRoD's basis), by role."""
    if by_module is None:
        return {}
    return {role: tensors[key] for key, role in by_module[1](module).items() if key in tensors}


def read_method_adapter(path: Path, config: dict[str, Any], *, weight: float) -> LoraAdapter:
    """A PEFT adapter of one of ``ROLES``' methods; its modules_to_save tensors replace the base's."""
    peft_type = str(config.get("peft_type"))
    where = path / "adapter_config.json"
    if peft_type in ("VERA", "PVERA", "RANDLORA", "FROD", "TINYLORA") and config.get("save_projection") is False:
        raise UnsupportedError(f"{where}: {peft_type} saved with save_projection=false: its shared projections are not in "
                               "the adapter (PEFT regenerates them from projection_prng_key); re-save it with "
                               "save_projection=True")
    if peft_type == "OFT":
        _check_oft(config, where, weight)
    if peft_type in ("HRA", "ROAD", "BOFT", "FROD") and weight != 1:
        raise UnsupportedError(f"{where}: a {peft_type} rotation cannot be weighted ({weight} given); merge it with "
                               "weight 1")
    if config.get("fan_in_fan_out"):
        raise UnsupportedError(f"{where}: {peft_type} with fan_in_fan_out (Conv1D layers, GPT-2 style) is not merged "
                               "by this version")
    weights_path, tensors, header, state = _index_tensors(path)
    suffixes = ROLES[peft_type]
    alternatives = "|".join(re.escape(x) for x in sorted(suffixes, key=len, reverse=True)) or "(?!)"
    pattern = re.compile(rf"^(?P<module>.+)\.(?P<suffix>{alternatives})$")
    grouped: dict[str, dict[str, TensorInfo]] = {}
    replacements: dict[str, TensorInfo] = {}
    shared = {role: tensors[key] for key, role in SHARED.get(peft_type, {}).items() if key in tensors}
    by_module = SHARED_BY_MODULE.get(peft_type)
    for key, info in tensors.items():
        match, param_path = pattern.match(key), key.removeprefix(PEFT_PREFIX)
        if key in SHARED.get(peft_type, {}) or (by_module and key.startswith(by_module[0])):
            continue
        if peft_type in REPLACING and REPLACING[peft_type] in param_path:  # LN tuning: the norm's own tensors
            replacements[param_path.replace(REPLACING[peft_type], ".")] = info
            continue
        if match:
            grouped.setdefault(match["module"].removeprefix(PEFT_PREFIX), {})[suffixes[match["suffix"]]] = info
        elif _saved_module(param_path, (config.get("modules_to_save") or []) + EMBEDDING_LAYERS):
            if ".original_module." not in param_path:
                replacements.setdefault(param_path.replace(".modules_to_save.", ".").replace(BASE_LAYER_SUFFIX, ".weight"),
                                        info)
        else:
            raise PlanError(f"{weights_path}: tensor {key!r} is not one of {peft_type}'s (expected '<module>."
                            f"{'|'.join(suffixes)}'); refusing to drop it silently")
    modules = {m: _module(peft_type, config, m, {**roles, **shared, **_shared_of(by_module, m, tensors)}, weights_path)
               for m, roles in grouped.items()}
    modules = {m: lora for m, lora in modules.items() if lora.method != "adalora" or lora.r > 0}  # (rank 0: no delta)
    if not modules and not replacements:
        raise InputError(f"{weights_path}: the adapter holds no {peft_type} tensors")
    adapter = LoraAdapter(path, weights_path, config, weight, tensors, modules, header, state, replacements)
    return assign_vectors(adapter) if peft_type == "TINYLORA" else adapter
