"""What an adapter is once read: its validated config, per-module factor keys and lazy tensor access.

Every adapter format (PEFT LoRA, PEFT's other methods, mlx-lm) is read into one ``LoraAdapter``
(one ``LoraModule`` per adapted layer: LoRA's factor keys, or another method's tensors by role);
tensors are read only when the merge reaches the base tensor they belong to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..formats.checkpoint import read_tensor_bytes
from ..formats.header import SafetensorsHeader, TensorInfo

if TYPE_CHECKING:
    import torch


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
    param_ranks: tuple[tuple[str, int, float, float], ...] = ()  # fused experts: (parameter, r, alpha, scaling)
    conv_dims: int = 0  # N-D factors: LoRA on a convolution (refused) or a damaged adapter
    # Other PEFT methods (``adapters/methods.py``): the delta registry's name, and role -> tensor key
    # (IA3: ``l``; LoHa: ``w1a w1b w2a w2b``; LoKr: ``w1`` or ``w1a w1b``, ``w2`` or ``w2a w2b``).
    method: str = "lora"
    keys: tuple[tuple[str, str], ...] = ()
    bias_method: str | None = None  # a delta the layer's bias takes too, when the base has one (IA3)
    row_group: int = 1  # rows a chunk must hold together (RoAd's groups of paired rows)
    target_param: str = "weight"  # the layer parameter the delta goes to (BEFT: the bias)

    def key(self, role: str) -> str:
        return dict(self.keys)[role]

    def has(self, role: str) -> bool:
        return role in dict(self.keys)


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

    def load_raw(self, key: str) -> torch.Tensor:
        """Read one adapter tensor in its stored dtype (integer indices beyond float32's 2^24, exactly)."""
        if self._bin is not None:
            return self._bin[key]
        from ..codecs.plain import read_tensor

        assert self._header is not None
        return read_tensor(self.weights_path, self._header, key)

    def load(self, key: str) -> torch.Tensor:
        """Read one adapter tensor as float32 (adapters are small; bf16 factors are widened exactly)."""
        import torch

        if self._bin is not None:
            return self._bin[key].to(torch.float32)
        from ..codecs.plain import read_tensor

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
        if module.method != "lora":
            if not _identity(adapter, module):
                return True
            continue
        if adapter._bin is not None:
            if bool(adapter._bin[module.b_key].any()):
                return True
            continue
        assert adapter._header is not None
        if read_tensor_bytes(adapter._header, module.b_key).strip(b"\0"):  # any bit set (-0.0 too: conservative)
            return True
    return False


# Other methods: roles any one of which, all zeros, makes the whole delta zero (PEFT initialises one
# of them so: an untrained adapter), and IA3's vector, an identity when all ones. Methods not listed
# are taken to change something (HRA, RoAd and GraLoRA's untrained states are not a zero factor).
ZERO_KILLS: dict[str, tuple[str, ...]] = {
    "loha": ("w1a", "w1b", "w2a", "w2b"), "lokr": ("w1", "w1a", "w1b", "w2", "w2a", "w2b"),
    "vera": ("lambda_b", "lambda_d"), "pvera": ("lambda_b", "lambda_d"), "adalora": ("A", "B", "E"),
    "delora": ("A", "B", "lambda"), "hira": ("A", "B"), "randlora": ("lambda", "gamma"), "c3a": ("kernel",),
    "shira": ("values",), "beft": ("bias",), "oft": ("R",), "miss": ("B",), "fourierft": ("spectrum",),
    "waveft": ("spectrum",), "tinylora": ("v",), "peanut": ("B",),
}
ONE = {"F32": b"\x00\x00\x80\x3f", "BF16": b"\x80\x3f", "F16": b"\x00\x3c"}  # 1.0, little-endian


def _identity(adapter: LoraAdapter, module: LoraModule) -> bool:
    """Does this module of another method provably change nothing (from its bytes, no torch)?"""
    if adapter._header is None:  # (.bin adapters: not read here)
        return False
    keys = dict(module.keys)
    if module.method in ("ia3_rows", "ia3_columns"):
        info = adapter.tensors[keys["l"]]
        return read_tensor_bytes(adapter._header, keys["l"]) == ONE.get(info.dtype, b"?") * info.numel
    return any(not read_tensor_bytes(adapter._header, keys[role]).strip(b"\0")
               for role in ZERO_KILLS.get(module.method, ()) if role in keys)
