"""PEFT LoRA adapters: the config, the tensor index, and the per-module factors.

An adapter becomes one ``LoraAdapter``: its validated config, and for every LoRA module the keys
of ``lora_A`` (r, in) and ``lora_B`` (out, r) with the module's scaling. Tensors are read only
when the merge reaches the base tensor they belong to.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import check_inside, read_tensor_bytes
from .errors import InputError, PlanError, UnsupportedError
from .header import SafetensorsHeader, TensorInfo, read_header
from .mlx import WEIGHTS_NAME as MLX_WEIGHTS
from .mlx import read_mlx_adapter

if TYPE_CHECKING:
    import torch

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
# Saved tensors of PEFT features this version cannot merge exactly; named in the refusal.
_UNSUPPORTED_KEYS = (
)
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


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``delta = scaling * (B @ A)`` with A (r, in) and B (out, r).

    For an Embedding (``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (dim, r)) the
    weight is (num_embeddings, dim) and ``delta = scaling * (B @ A).T``.
    """

    module: str  # in-memory module path, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    r: int
    lora_alpha: float
    scaling: float
    embedding: bool = False
    magnitude_key: str | None = None  # DoRA: m (out,), and W' = m / ||W + dW||_row * (W + dW)
    bias_key: str | None = None  # lora_bias: lora_B.bias (out,), and bias += scaling * lora_B.bias
    # target_parameters on fused experts (E, out, in): A (r*E, in), B (out, r*E); expert e takes
    # A[e*r:(e+1)*r] and B[:, e::E]. ``experts`` = E, ``container`` = the experts module path.
    experts: int = 0
    container: str = ""
    conv_dims: int = 0  # N-D factors: LoRA on a convolution (refused) or a damaged adapter


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter directory, validated, with lazy access to its tensors."""

    path: Path
    weights_path: Path
    config: dict[str, Any]
    weight: float  # this adapter's share when several are merged: delta *= weight
    tensors: dict[str, TensorInfo]  # key -> header entry (for .bin: shape/dtype only)
    modules: dict[str, LoraModule]
    _header: SafetensorsHeader | None = None
    _bin: dict[str, Any] | None = None
    # "<module>.<param>" -> a full tensor saved with the adapter that replaces the base's: PEFT's
    # save_embedding_layers ("<module>.base_layer.weight", LoRA is added on top) and
    # modules_to_save ("<module>.<param>", used as is). After loading, PEFT uses them, so do we.
    replacements: dict[str, TensorInfo] = field(default_factory=dict)
    # module -> (token ids, "<module>.token_adapter.trainable_tokens_delta" (len(ids), dim)): rows
    # of the module's weight replaced by the saved values (PEFT's trainable_token_indices).
    token_rows: dict[str, tuple[list[int], TensorInfo]] = field(default_factory=dict)
    origin: str | None = None  # "org/name@commit" when read from the Hub (its identity for resuming)
    transposed_keys: frozenset[str] = frozenset()  # stored transposed (mlx-lm): load() turns them

    @property
    def label(self) -> str:
        return self.path.name or str(self.path)

    def load(self, key: str) -> torch.Tensor:
        """Read one adapter tensor as float32 (adapters are small; bf16 factors are widened exactly)."""
        import torch

        if self._bin is not None:
            return self._bin[key].to(torch.float32)
        from .tensors import read_tensor

        assert self._header is not None
        tensor = read_tensor(self.weights_path, self._header, key).to(torch.float32)
        return tensor.t().contiguous() if key in self.transposed_keys else tensor


def changes_something(adapter: LoraAdapter) -> bool:
    """False when every lora_B is all zeros (PEFT's initialisation: an untrained adapter) or the
    adapter's weight is 0. Stops at the first non-zero factor, so this is cheap for real adapters."""
    if adapter.weight == 0:
        return False
    if adapter.replacements or adapter.token_rows:
        return True
    for module in adapter.modules.values():
        if adapter._bin is not None:
            if bool(adapter._bin[module.b_key].any()):
                return True
            continue
        assert adapter._header is not None
        if read_tensor_bytes(adapter._header, module.b_key).strip(b"\0"):  # any bit set (-0.0 too: conservative)
            return True
    return False


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


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise InputError(
            f"adapter {path}: no {CONFIG_NAME}; pass the directory written by PEFT's save_pretrained"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{config_path}: must hold a JSON object")
    return config


def _check_config(config: dict[str, Any], where: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{where}: peft_type {peft_type!r} is not mergeable by streammerge (only 'LORA' is)"
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


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """PEFT's rule: the first key (in dict order) with ``re.match(rf"(.*\\.)?({key})$", module)``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _experts_container(config: dict[str, Any], module: str) -> str:
    """The fused-experts module a target_parameters factor belongs to ('' if none). PEFT nests one
    wrapper per targeted parameter, so the keys may end in '.base_layer' once or more."""
    container = re.sub(r"(\.base_layer)+$", "", module)
    for target in config.get("target_parameters") or []:
        if isinstance(target, str) and container.endswith(target.rpartition(".")[0]):
            return container
    return ""


def _module_of(config: dict[str, Any], module: str, a: TensorInfo, b: TensorInfo, where: Path, *,
               embedding: bool) -> LoraModule:
    r = int(_pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
    container = _experts_container(config, module)
    if not container and len(a.shape) == len(b.shape) in (3, 4, 5):  # convolution factors; the plan decides
        return LoraModule(module, a.name, b.name, r, alpha, alpha / r, conv_dims=len(a.shape))
    if container and len(a.shape) == 2 and len(b.shape) == 2 and a.shape[0] % r == 0 and b.shape[1] == a.shape[0]:
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        return LoraModule(module, a.name, b.name, r, alpha, scaling, experts=a.shape[0] // r, container=container)
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
    raise InputError(f"adapter {path}: no {' or '.join(WEIGHTS_NAMES)} (PEFT) or {MLX_WEIGHTS} (mlx-lm)")


def read_adapter(path: Path, *, weight: float = 1.0) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory; group its tensors into modules."""
    if not path.is_dir():
        raise InputError(f"adapter {path}: not a directory (pass the folder holding {CONFIG_NAME})")
    config = _read_config(path)
    if (path / MLX_WEIGHTS).is_file() and not any((path / n).exists() for n in WEIGHTS_NAMES):
        check_inside(path / MLX_WEIGHTS, path)
        return read_mlx_adapter(path, config, weight=_finite(weight, path))
    _check_config(config, path / CONFIG_NAME)
    weights_path, tensors, header, state = _index_tensors(path)
    pairs: dict[str, dict[str, TensorInfo]] = {}
    embedding_modules: set[str] = set()
    replacements: dict[str, TensorInfo] = {}
    token_rows: dict[str, tuple[list[int], TensorInfo]] = {}
    magnitudes: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        for pattern, feature in _UNSUPPORTED_KEYS:
            if pattern.search(key):
                raise UnsupportedError(
                    f"{weights_path}: tensor {key!r} belongs to {feature}, which this version "
                    "does not merge; nothing was written"
                )
        if key.endswith(MAGNITUDE_SUFFIXES):  # DoRA
            module = re.sub(r"\.lora_magnitude_vector(\.weight)?$", "", key).removeprefix(PEFT_PREFIX)
            magnitudes[module] = info
            continue
        param_path = key.removeprefix(PEFT_PREFIX)
        if key.endswith(TOKENS_SUFFIX):  # trainable_token_indices
            module = param_path.removesuffix(TOKENS_SUFFIX)
            token_rows[module] = (_token_ids(config, module, info, weights_path), info)
            continue
        if key.endswith(BASE_LAYER_SUFFIX):  # PEFT save_embedding_layers: the layer's own weight
            replacements[param_path.removesuffix(BASE_LAYER_SUFFIX) + ".weight"] = info
            continue
        match = _LORA_KEY.match(key)
        if match is None and param_path.endswith(".bias") and config.get("bias") in ("all", "lora_only"):
            # a trained bias (bias="all"/"lora_only"): replaces the base's ("<m>.base_layer.bias" when m has LoRA)
            replacements[param_path.replace(".base_layer.", ".")] = info
            continue
        if match is None and _saved_module(param_path, (config.get("modules_to_save") or []) + EMBEDDING_LAYERS):
            # A modules_to_save tensor replaces the base's. With resized embeddings PEFT also saves the
            # wrapper's parts: ".modules_to_save." (the same trained tensor) and ".original_module."
            # (the untrained copy, which PEFT's forward does not use while the wrapper is active).
            if ".original_module." in param_path:
                continue
            param_path = param_path.replace(".modules_to_save.", ".")
            if param_path in replacements and replacements[param_path].shape != info.shape:
                raise InputError(f"{weights_path}: {key!r} and the saved {param_path!r} disagree in shape")
            replacements.setdefault(param_path, info)
            continue
        if match is None:
            raise PlanError(
                f"{weights_path}: tensor {key!r} is not a LoRA factor (expected '<module>.lora_A.weight' / "
                "'<module>.lora_B.weight' or '<module>.lora_embedding_A/B'); refusing to drop it silently"
            )
        module = match["module"].removeprefix(PEFT_PREFIX)
        factor = "lora_B.bias" if match["bias"] else match["factor"] or f"lora_{match['emb']}"
        if match["emb"]:
            embedding_modules.add(module)
        pairs.setdefault(module, {})[factor] = info
    modules: dict[str, LoraModule] = {}
    for module, factors in pairs.items():
        if {"lora_A", "lora_B"} - set(factors):
            missing = ({"lora_A", "lora_B"} - set(factors)).pop()
            raise InputError(f"{weights_path}: module {module!r} has no {missing} tensor")
        lora = _module_of(config, module, factors["lora_A"], factors["lora_B"], weights_path,
                          embedding=module in embedding_modules)
        if "lora_B.bias" in factors:
            if factors["lora_B.bias"].shape != (factors["lora_B"].shape[0],):
                raise InputError(f"{weights_path}: {module!r} has a lora_B.bias of shape "
                                 f"{list(factors['lora_B.bias'].shape)}, expected [{factors['lora_B'].shape[0]}]")
            lora = dataclasses.replace(lora, bias_key=factors["lora_B.bias"].name)
        magnitude = magnitudes.pop(module, None)
        if magnitude is not None:
            # m has one entry per output feature: B's rows (Linear, Conv1D); the embedding dim (Embedding)
            if magnitude.shape != (factors["lora_B"].shape[0],):
                raise InputError(f"{weights_path}: {module!r} has a DoRA magnitude of shape {list(magnitude.shape)}, "
                                 f"expected [{factors['lora_B'].shape[0]}]")
            lora = dataclasses.replace(lora, magnitude_key=magnitude.name)
        modules[module] = lora
    if magnitudes:
        raise InputError(f"{weights_path}: DoRA magnitudes without LoRA factors: {sorted(magnitudes)[:3]}")
    plain = sorted(m for m, lora in modules.items() if not lora.magnitude_key)
    dora = len(modules) - len(plain)
    if bool(config.get("use_dora")) != bool(dora) or (dora and plain):
        raise InputError(
            f"{weights_path}: the config says use_dora={bool(config.get('use_dora'))} but "
            f"{dora} module(s) have a lora_magnitude_vector and {len(plain)} do not; the adapter files are inconsistent"
        )
    if not modules and not token_rows and not replacements:
        raise InputError(f"{weights_path}: the adapter holds no LoRA tensors")
    _finite(weight, path)
    if (replacements or token_rows) and state is not None:
        raise UnsupportedError(f"{weights_path}: full tensors or token rows in a .bin adapter; "
                               "re-save the adapter as safetensors")
    return LoraAdapter(path, weights_path, config, weight, tensors, modules, header, state, replacements, token_rows)


def _finite(weight: float, path: Path) -> float:
    if not math.isfinite(weight):
        raise InputError(f"adapter {path}: weight {weight!r} is not a finite number")
    return weight
