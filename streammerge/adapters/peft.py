"""PEFT LoRA adapters: the config, the tensor index, and the per-module factors.

A PEFT directory becomes one ``LoraAdapter`` (``types.py``): its validated config, and for every
LoRA module the keys of ``lora_A`` (r, in) and ``lora_B`` (out, r) with the module's scaling.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, PlanError, UnsupportedError
from ..formats.checkpoint import check_inside
from ..formats.header import SafetensorsHeader, TensorInfo, read_header
from .types import LoraAdapter, LoraModule

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
BASE_LAYER_SUFFIX = ".base_layer.weight"
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
# PEFT saves these layers whole when it sees them resized (save_embedding_layers), as "<name>.weight".
EMBEDDING_LAYERS = ["embed_tokens", "lm_head"]
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
MAX_RANK = 1 << 16

# Linear / Conv1D factors end in ".weight"; Embedding factors are bare parameters.
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<factor>lora_A|lora_B)\.weight|lora_embedding_(?P<emb>[AB])|lora_B\.(?P<bias>bias))$")
_SAFE_INIT = (True, False, "gaussian", "eva", "orthogonal")
# Config fields whose truthy value means the saved factors alone do not reproduce the model.
_UNSUPPORTED_FIELDS = {
    "layer_replication": "layer_replication (the merged model would need duplicated layers)",
    "alora_invocation_tokens": "aLoRA (activated only after invocation tokens)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron parallel LoRA layers",
}


def _token_ids(config: dict[str, Any], module: str, info: TensorInfo, where: Path) -> list[int]:
    """The token ids of ``module``'s trainable rows: a list (the input embedding) or {name suffix: list}."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        spec = next((ids for name, ids in spec.items() if isinstance(name, str) and module.endswith(name)), None)
    if (not isinstance(spec, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec)
            or len(set(spec)) != len(spec)):
        raise InputError(f"{where}: trainable_token_indices for {module!r} must be a list of distinct token ids, "
                         f"got {spec!r}")
    if len(info.shape) != 2 or info.shape[0] != len(spec):
        raise InputError(f"{where}: {module!r} saves {list(info.shape)} token rows for {len(spec)} token ids")
    return spec


def _saved_module(param_path: str, modules_to_save: list[str]) -> bool:
    """Is ``<module>.<param>`` a tensor of a modules_to_save module? PEFT's rule is a plain string
    suffix (``key.endswith(target)``), so "norm" also takes "input_layernorm"; the same here."""
    module = param_path.rpartition(".")[0].removesuffix(".modules_to_save").removesuffix(".original_module")
    return any(module.endswith(m) for m in modules_to_save if isinstance(m, str))


MERGED_TYPES = ("LORA, ADALORA, BEFT, BOFT, C3A, DEFT, DELORA, FOURIERFT, FROD, GLORA, GRALORA, HIRA, HRA, IA3, "
                "LN_TUNING, LOHA, LOKR, MISS, OFT, OSF, PEANUT, PVERA, RANDLORA, ROAD, SHIRA, SUPERTUNING, TINYLORA, "
                "UNILORA, VBLORA, VERA and WAVEFT")
# PEFT types with no static weight delta: why each cannot be merged into the weights at all
NO_WEIGHT_DELTA = {
    "PROMPT_TUNING": "soft prompt tokens prepended to the input",
    "MULTITASK_PROMPT_TUNING": "soft prompt tokens prepended to the input",
    "P_TUNING": "prompt tokens from a prompt encoder",
    "PREFIX_TUNING": "key/value prefixes added to every attention layer at run time",
    "ADAPTION_PROMPT": "gated prompts added to attention at run time (LLaMA-Adapter)",
    "CPT": "context-aware prompt tokens",
    "CARTRIDGE": "a trained KV-cache prefix",
    "POLY": "a router mixing several LoRA skills per task at run time",
    "XLORA": "a classifier mixing LoRA experts per token at run time",
    "LILY": "projectors shared across layers and mixed by a router at run time",
    "SHADOW": "a side network run beside the model",
}


# PEFT types that change the weights but are not merged by this version: why
NOT_MERGED = {
    "PSOFT": "rebuilt at load time from a float32 SVD of the base weight (its A and B are not saved), and the saved "
             "rotation only fits the singular vectors' signs that SVD happened to give: a merge that recomputes them "
             "elsewhere (another LAPACK, the GPU, another dtype) may silently apply it to flipped vectors",
    "ADAMSS": "subspaces found by clustering the base weight (scikit-learn) at load time, not read by this version",
}


def _check_config(config: dict[str, Any], where: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type in NO_WEIGHT_DELTA:
        raise UnsupportedError(f"{where}: peft_type {peft_type!r} is {NO_WEIGHT_DELTA[peft_type]}, not a change of the "
                               "weights: there is nothing to merge; use it with PEFT at inference")
    if peft_type in NOT_MERGED:
        raise UnsupportedError(f"{where}: peft_type {peft_type!r} is not merged by streammerge: its delta is "
                               f"{NOT_MERGED[peft_type]}; merge it with PEFT's merge_and_unload on a machine that holds "
                               "the model")
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{where}: peft_type {peft_type!r} is not mergeable by streammerge ({MERGED_TYPES} are)"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= MAX_RANK:
        raise InputError(f"{where}: 'r' must be an integer from 1 to {MAX_RANK}, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InputError(f"{where}: 'lora_alpha' must be a finite number, got {alpha!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in pattern.values()
        ):
            raise InputError(f"{where}: '{name}' must map regexes to numbers, got {pattern!r}")
        for key in pattern:
            try:
                re.compile(key)
            except re.error as exc:
                raise InputError(f"{where}: '{name}' key {key!r} is not a valid regex ({exc})") from None
    for field_name, feature in _UNSUPPORTED_FIELDS.items():
        if config.get(field_name):
            raise UnsupportedError(
                f"{where}: the adapter uses {feature}, which this streammerge version does not "
                "merge; nothing was written"
            )
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise InputError(f"{where}: 'bias' must be 'none', 'all' or 'lora_only', got {config['bias']!r}")
    init = config.get("init_lora_weights", True)
    if init not in _SAFE_INIT:
        raise UnsupportedError(
            f"{where}: init_lora_weights={init!r} changes the base weights at initialisation; "
            "convert the adapter to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first key (in dict order) with ``re.match(rf"(.*\\.)?({key})$", module)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers v5's fused expert parameters


def _rank_alpha(config: dict[str, Any], key: str) -> tuple[int, float, float]:
    """r, alpha and scaling of one targeted parameter, as PEFT's patterns give them for ``key``."""
    r = int(_pattern_value(config.get("rank_pattern") or {}, key, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, key, config["lora_alpha"]))
    return r, alpha, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _experts_container(config: dict[str, Any], module: str, rows: int, r: int) -> str:
    """The fused-experts module a target_parameters factor belongs to ('' if none). PEFT nests one
    wrapper per targeted parameter, so the keys may end in '.base_layer' once or more."""
    container = re.sub(r"(\.base_layer)+$", "", module)
    params = {}  # the targeted parameters this module may own, the most specific target first
    for target in sorted((t for t in config.get("target_parameters") or [] if isinstance(t, str)),
                         key=lambda t: -t.count(".")):
        owner, _, param = target.rpartition(".")
        if not owner or container == owner or container.endswith("." + owner):
            params.setdefault(bool(owner), param)
    if params.get(True, "weight") != "weight":
        return container
    # a bare parameter name ("gate_up_proj", as PEFT's all-linear adds it) is any module's that owns one,
    # which the file does not say: fused experts' factors have r x experts rows, a plain LoRA's r
    return container if True not in params and params.get(False, "weight") != "weight" and rows != r else ""


def _module_of(config: dict[str, Any], module: str, a: TensorInfo, b: TensorInfo, where: Path, *,
               embedding: bool) -> LoraModule:
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    container = _experts_container(config, module, a.shape[0] if a.shape else 0, r)
    if not container and len(a.shape) == len(b.shape) in (3, 4, 5):  # convolution factors; the plan decides
        return LoraModule(module, a.name, b.name, r, alpha, alpha / r, conv_dims=len(a.shape))
    if container and len(a.shape) == 2 and len(b.shape) == 2 and b.shape[1] == a.shape[0]:
        # (r and alpha as PEFT reads them for the parameter, "<container>.gate_up_proj" or ".down_proj":
        # which one these factors are is told by the base's shapes, in the plan)
        ranks = tuple((param, *_rank_alpha(config, f"{container}.{param}")) for param in FUSED_EXPERT_PARAMS)
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        return LoraModule(module, a.name, b.name, r, alpha, scaling, experts=a.shape[0] // r if a.shape[0] % r == 0
                          else 0, container=container, param_ranks=ranks)
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
        raise InputError(
            f"{where}: module {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)} "
            f"but the config says r={r}; the adapter files are inconsistent"
        )
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraModule(module, a.name, b.name, r, alpha, scaling, embedding)


def _index_tensors(path: Path) -> tuple[Path, dict[str, TensorInfo], SafetensorsHeader | None, dict | None]:
    st, binary = (path / n for n in WEIGHTS_NAMES)
    for candidate in (st, binary, path / CONFIG_NAME):
        if candidate.exists():
            check_inside(candidate, path)
    if st.is_file():
        header = read_header(st)
        return st, dict(header.tensors), header, None
    if binary.is_file():
        import torch

        try:
            state = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # pickle errors come in many types; all mean "unreadable"
            raise InputError(f"{binary}: cannot load safely with weights_only=True ({exc})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise InputError(f"{binary}: expected a dict of tensors")
        infos = {
            k: TensorInfo(k, "F32", tuple(v.shape), 0, v.numel() * 4) for k, v in state.items()
        }
        return binary, infos, None, state
    raise InputError(f"adapter {path}: no {' or '.join(WEIGHTS_NAMES)} (PEFT) or adapters.safetensors (mlx-lm)")


@dataclass
class _Keys:
    """An adapter file's tensors sorted by what they are (see ``_sort_keys``)."""

    pairs: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # module -> factor -> tensor
    embedding_modules: set[str] = field(default_factory=set)
    replacements: dict[str, TensorInfo] = field(default_factory=dict)
    token_rows: dict[str, tuple[list[int], TensorInfo]] = field(default_factory=dict)
    magnitudes: dict[str, TensorInfo] = field(default_factory=dict)


def _sort_key(keys: _Keys, key: str, info: TensorInfo, config: dict[str, Any], weights_path: Path) -> None:
    if key.endswith(MAGNITUDE_SUFFIXES):  # DoRA
        keys.magnitudes[re.sub(r"\.lora_magnitude_vector(\.weight)?$", "", key).removeprefix(PEFT_PREFIX)] = info
        return
    param_path = key.removeprefix(PEFT_PREFIX)
    if key.endswith(TOKENS_SUFFIX):  # trainable_token_indices
        module = param_path.removesuffix(TOKENS_SUFFIX)
        keys.token_rows[module] = (_token_ids(config, module, info, weights_path), info)
        return
    if key.endswith(BASE_LAYER_SUFFIX):  # PEFT save_embedding_layers: the layer's own weight
        keys.replacements[param_path.removesuffix(BASE_LAYER_SUFFIX) + ".weight"] = info
        return
    match = _LORA_KEY.match(key)
    if match is None and param_path.endswith(".bias") and config.get("bias") in ("all", "lora_only"):
        # a trained bias (bias="all"/"lora_only"): replaces the base's ("<m>.base_layer.bias" when m has LoRA)
        keys.replacements[param_path.replace(".base_layer.", ".")] = info
        return
    if match is None and _saved_module(param_path, (config.get("modules_to_save") or []) + EMBEDDING_LAYERS):
        # A modules_to_save tensor replaces the base's. With resized embeddings PEFT also saves the
        # wrapper's parts: ".modules_to_save." (the same trained tensor) and ".original_module."
        # (the untrained copy, which PEFT's forward does not use while the wrapper is active).
        if ".original_module." in param_path:
            return
        param_path = param_path.replace(".modules_to_save.", ".")
        if param_path in keys.replacements and keys.replacements[param_path].shape != info.shape:
            raise InputError(f"{weights_path}: {key!r} and the saved {param_path!r} disagree in shape")
        keys.replacements.setdefault(param_path, info)
        return
    if match is None:
        raise PlanError(
            f"{weights_path}: tensor {key!r} is not a LoRA factor (expected '<module>.lora_A.weight' / "
            "'<module>.lora_B.weight' or '<module>.lora_embedding_A/B'); refusing to drop it silently"
        )
    module = match["module"].removeprefix(PEFT_PREFIX)
    if match["emb"]:
        keys.embedding_modules.add(module)
    keys.pairs.setdefault(module, {})["lora_B.bias" if match["bias"] else match["factor"] or f"lora_{match['emb']}"] = info


def _with_extras(lora: LoraModule, factors: dict[str, TensorInfo], magnitude: TensorInfo | None,
                 weights_path: Path) -> LoraModule:
    """A module's lora_B.bias and DoRA magnitude, each with one entry per output feature (B's rows)."""
    out = factors["lora_B"].shape[0]
    for name, extra in (("a lora_B.bias", factors.get("lora_B.bias")), ("a DoRA magnitude", magnitude)):
        if extra is not None and extra.shape != (out,):
            raise InputError(f"{weights_path}: {lora.module!r} has {name} of shape {list(extra.shape)}, expected [{out}]")
    bias = factors.get("lora_B.bias")
    return dataclasses.replace(lora, bias_key=bias.name if bias else None,
                               magnitude_key=magnitude.name if magnitude else None)


def _modules(keys: _Keys, config: dict[str, Any], weights_path: Path) -> dict[str, LoraModule]:
    modules: dict[str, LoraModule] = {}
    for module, factors in keys.pairs.items():
        if {"lora_A", "lora_B"} - set(factors):
            missing = ({"lora_A", "lora_B"} - set(factors)).pop()
            raise InputError(f"{weights_path}: module {module!r} has no {missing} tensor")
        lora = _module_of(config, module, factors["lora_A"], factors["lora_B"], weights_path,
                          embedding=module in keys.embedding_modules)
        modules[module] = _with_extras(lora, factors, keys.magnitudes.pop(module, None), weights_path)
    if keys.magnitudes:
        raise InputError(f"{weights_path}: DoRA magnitudes without LoRA factors: {sorted(keys.magnitudes)[:3]}")
    plain = sorted(m for m, lora in modules.items() if not lora.magnitude_key)
    dora = len(modules) - len(plain)
    if bool(config.get("use_dora")) != bool(dora) or (dora and plain):
        raise InputError(
            f"{weights_path}: the config says use_dora={bool(config.get('use_dora'))} but "
            f"{dora} module(s) have a lora_magnitude_vector and {len(plain)} do not; the adapter files are inconsistent"
        )
    return modules


def read_peft_adapter(path: Path, config: dict[str, Any], *, weight: float) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory; group its tensors into modules."""
    _check_config(config, path / CONFIG_NAME)
    weights_path, tensors, header, state = _index_tensors(path)
    keys = _Keys()
    for key, info in tensors.items():
        _sort_key(keys, key, info, config, weights_path)
    modules = _modules(keys, config, weights_path)
    if not modules and not keys.token_rows and not keys.replacements:
        raise InputError(f"{weights_path}: the adapter holds no LoRA tensors")
    if (keys.replacements or keys.token_rows) and state is not None:
        raise UnsupportedError(f"{weights_path}: full tensors or token rows in a .bin adapter; "
                               "re-save the adapter as safetensors")
    return LoraAdapter(path, weights_path, config, weight, tensors, modules, header, state, keys.replacements,
                       keys.token_rows)
