"""PEFT methods other than LoRA (IA3, LoHa, LoKr, VeRA, AdaLoRA), on tiny real Llama and Qwen2 models
(Qwen2's q/k/v have biases, which output-side IA3 scales too).

Each adapter is made and saved by PEFT with every trainable tensor randomised (an untrained IA3 is
all ones, an untrained LoHa or LoKr all zeros: either would prove nothing). Oracles: PEFT's own
``merge_and_unload`` on a float32 copy of the base, and a float64 recomputation written here from
each method's formula on the saved tensors; untouched tensors bit-identical to the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracle import bits, build_base, read_checkpoint
from safetensors.torch import load_file

from streammerge.cli import main

peft = pytest.importorskip("peft")

CONFIGS = {
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                  init_ia3_weights=False),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    "lokr-decomposed": lambda: peft.LoKrConfig(r=2, alpha=6, target_modules=["q_proj", "o_proj", "up_proj"],
                                               init_weights=False, decompose_both=True),
    "lokr-factor": lambda: peft.LoKrConfig(r=4, alpha=8, decompose_factor=4, init_weights=False,
                                           target_modules=["q_proj", "v_proj", "down_proj"]),
    "vera": lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    "oft": lambda: peft.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj", "v_proj", "down_proj"]),
    "oft-cayley-shared": lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                use_cayley_neumann=False, block_share=True),
    "oft-coft-3-terms": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                               coft=True, eps=0.5, num_cayley_neumann_terms=3),
    "hra": lambda: peft.HRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "hra-gram-schmidt": lambda: peft.HRAConfig(r=4, apply_GS=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "shira": lambda: peft.ShiraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "road-1": lambda: peft.RoadConfig(variant="road_1", group_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "road-2": lambda: peft.RoadConfig(variant="road_2", group_size=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "road-4": lambda: peft.RoadConfig(variant="road_4", group_size=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "miss": lambda: peft.MissConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "miss-mini": lambda: peft.MissConfig(r=8, mini_r=4, init_weights="mini", target_modules=["q_proj", "v_proj", "down_proj"]),
    "miss-bat": lambda: peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj", "v_proj", "down_proj"]),
    "c3a": lambda: peft.C3AConfig(block_size=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "delora": lambda: peft.DeloraConfig(r=4, delora_lambda=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    "hira": lambda: peft.HiraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "pvera": lambda: peft.PveraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    "randlora": lambda: peft.RandLoraConfig(r=8, randlora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gralora": lambda: peft.GraloraConfig(r=8, gralora_k=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    "gralora-hybrid": lambda: peft.GraloraConfig(r=8, gralora_k=4, hybrid_r=2, alpha=16,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]),
    "boft": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "vblora": lambda: peft.VBLoRAConfig(r=4, vector_length=16, num_vectors=32, topk=3,
                                        target_modules=["q_proj", "v_proj", "down_proj"]),
    "vblora-topk-only": lambda: peft.VBLoRAConfig(r=4, vector_length=16, num_vectors=32, topk=3,
                                                  save_only_topk_weights=True,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]),
    "supertuning": lambda: peft.SupertuningConfig(sparsity=0.95, target_modules=["q_proj", "v_proj", "down_proj"]),
    "supertuning-lora": lambda: peft.SupertuningConfig(sparsity=0.95, r=4, lora_alpha=8,
                                                       target_modules=["q_proj", "v_proj", "down_proj"]),
    "unilora": lambda: peft.UniLoraConfig(r=4, save_indices=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "deft": lambda: peft.DeftConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "deft-qr": lambda: peft.DeftConfig(r=4, decomposition_method="qr", target_modules=["q_proj", "v_proj", "down_proj"]),
    "deft-para": lambda: peft.DeftConfig(r=4, para=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "peanut": lambda: peft.PeanutConfig(r=8, depth=2, act_fn="gelu", scaling=0.5,
                                        target_modules=["q_proj", "v_proj", "down_proj"]),
    "osf": lambda: peft.OSFConfig(target_modules=["q_proj", "v_proj", "down_proj"]),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=300, scaling=150.0, random_loc_seed=123,
                                              target_modules=["q_proj", "v_proj", "down_proj"]),
    "waveft": lambda: peft.WaveFTConfig(n_frequency=200, scaling=2.0, random_loc_seed=5,
                                        target_modules=["q_proj", "v_proj", "down_proj"]),
    "waveft-sym4": lambda: peft.WaveFTConfig(n_frequency=200, scaling=2.0, wavelet_family="sym4",
                                             target_modules=["q_proj", "v_proj", "down_proj"]),
    "waveft-direct": lambda: peft.WaveFTConfig(n_frequency=200, scaling=2.0, use_idwt=False,
                                               target_modules=["q_proj", "v_proj", "down_proj"]),
    "tinylora": lambda: peft.TinyLoraConfig(r=2, u=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "tinylora-tied": lambda: peft.TinyLoraConfig(r=3, u=8, weight_tying=0.5, projection_seed=7,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]),
    "glora": lambda: peft.GloraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "glora-vectors": lambda: peft.GloraConfig(r=4, config_A_B="vector", config_C="vector", config_D_E="vector",
                                              target_modules=["q_proj", "v_proj", "down_proj"]),
    "glora-constants": lambda: peft.GloraConfig(r=4, config_A_B="constant", config_C="none", config_D_E="constant",
                                                target_modules=["q_proj", "v_proj", "down_proj"]),
    "frod": lambda: peft.FrodConfig(sparse_rate=0.05, target_modules=["q_proj", "v_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Llama and Qwen2, bf16, sharded; Qwen2's biases made non-zero (transformers initialises them to
    zero, and a zero bias scaled or not is the same)."""
    import transformers

    root = tmp_path_factory.mktemp("methods")
    made = {arch: build_base(arch, root / arch, dtype="bf16", sharded=True) for arch in ("llama", "qwen2")}
    model = transformers.AutoModelForCausalLM.from_pretrained(made["qwen2"], dtype=torch.bfloat16)
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.data = torch.randn_like(p) * 0.1
    model.save_pretrained(made["qwen2"], max_shard_size="40KB")
    return made


def make_adapter(base: Path, out: Path, kind: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter saved by PEFT (every trainable tensor random), and PEFT's own float32 merge."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(model, CONFIGS[kind]())
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if p.requires_grad:  # ia3_l around 1, factors of moderate size
            p.data = (1 + 0.5 * torch.randn_like(p)) if "ia3_l" in name else 0.3 * torch.randn_like(p)
    model.save_pretrained(out)
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    return out, merged


def formula(kind: str, saved: dict[str, torch.Tensor], config: dict, module: str, w: torch.Tensor) -> torch.Tensor:
    """W merged with one module of the adapter, in float64, from the method's definition."""
    t = {k.removeprefix(f"base_model.model.{module}."): v.double() for k, v in saved.items()
         if k.startswith(f"base_model.model.{module}.")}
    w = w.double()
    if kind.startswith("oft"):
        return w @ oft_rotation(t["oft_R.weight"], config, w.shape[1]).T
    if kind.startswith("hra"):
        return w @ hra_rotation(t["hra_u"], config)
    if kind.startswith("vblora"):  # B @ A from the bank, PEFT's own arithmetic on a layer it loads
        return w + vblora_delta(t, saved, config)
    if kind == "boft":  # (W R^T) * s: R block-diagonal, the Cayley map of each block's skew part
        return w @ boft_rotation(t["boft_R"]).T * t["boft_s"]
    if kind == "ia3":
        return w * t["ia3_l"]  # (out, 1) scales rows, (1, in) columns
    if kind.startswith("road"):  # R W with PEFT's own matrix form of R (its _get_delta_weight)
        from peft.tuners.road.layer import _get_delta_weight

        return _get_delta_weight(config["variant"], config["group_size"], t["road_theta"], t["road_alpha"]) @ w
    if kind.startswith("miss"):  # PEFT's own merge arithmetic (its get_delta_weight*) on float64 copies
        return miss_merged(t["miss_block"], config, w)
    if kind.startswith("deft"):  # W + Q_P (R alpha / r - right^T W), Q_P / right: P / relu(P) or qr(P)
        p = t["deft_P"]
        q, right = (torch.linalg.qr(p)[0],) * 2 if config["decomposition_method"] == "qr" else (p, p.clamp(min=0))
        injected = t["deft_R"] * (config["alpha"] / p.shape[1] if config.get("alpha") else 1) if "deft_R" in t else 0
        return w + q @ (injected - right.T @ w)
    if kind == "peanut":  # W + s B h^T, h the encoder / decoder network on act(W^T A^T), with residuals
        act, depth = torch.nn.functional.gelu, config["depth"]
        h, residuals = act(w.T @ t["peanut_A.weight"].T), []
        for i in range(depth):
            residuals.append(h)
            h = act(h @ t[f"peanut_encoders.{i}.weight"].T)
        for i in range(depth):
            h = act(h @ t[f"peanut_decoders.{i}.weight"].T) + residuals[depth - 1 - i]
        return w + config["scaling"] * t["peanut_B.weight"] @ h.T
    if kind == "osf":  # W's own SVD with its low part replaced by the trained U S V
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        k = s.shape[0] - t["osf_svd_params.S_low"].shape[0]
        trained = (t["osf_svd_params.U_low"] * t["osf_svd_params.S_low"]) @ t["osf_svd_params.V_low"]
        return (u[:, :k] * s[:k]) @ vt[:k] + trained
    if kind.startswith("tinylora"):  # B (sum_i v_i P_i) A, v the group's of the module's place in the model
        return w + t["tinylora_B"] @ torch.einsum("i,ijk->jk", tinylora_v(saved, config, module), t["tinylora_P"]) \
            @ t["tinylora_A"]
    if kind.startswith("glora"):  # W + W * A + B (a path: Xd @ Xu, a column X, a scalar X, zeros)
        return w + w * glora_path(t, "A") + glora_path(t, "B")
    if kind.startswith("waveft"):  # scaling * (the Haar idwt2 of the spectrum, or the spectrum itself)
        return w + waveft_delta(t["waveft_spectrum"], config, w.shape)
    if kind == "fourierft":  # scaling * Re(ifft2) of the spectrum at the locations torch.randperm gives the seed
        return w + fourier_delta(t["fourierft_spectrum"], config, w.shape)
    if kind == "frod":  # U (S + diag(lambda)) V^T, U = W V^-T with unit columns, S sparse, V the category's
        return frod_merged(t, saved, module, w)
    if kind.startswith("gralora"):  # the k x k grid of low-rank blocks, + the hybrid LoRA
        a, b = t["gralora_A"], t["gralora_B"]
        k, _, r = a.shape
        sub = r // k
        grid = [[b[i, j * sub:(j + 1) * sub].T @ a[j, :, i * sub:(i + 1) * sub].T for j in range(k)] for i in range(k)]
        delta = torch.cat([torch.cat(row, dim=1) for row in grid], dim=0)
        hybrid = t.get("gralora_A_general.weight")
        if hybrid is not None:
            delta = delta + t["gralora_B_general.weight"] @ hybrid
        return w + config["alpha"] / (r + (0 if hybrid is None else hybrid.shape[0])) * delta
    if kind == "randlora":  # PEFT's own get_delta_weight, on a layer rebuilt from the saved tensors
        return w + randlora_delta(t, saved, config, w.shape)
    if kind == "c3a":  # PEFT's own circulant construction (FFT), over in_features
        from peft.tuners.c3a.utils import get_circulant_fast

        return w + get_circulant_fast(t["c3a_kernel"]) / w.shape[1]
    if kind == "delora":  # B diag(lambda / r / (|A_i| |B^i|)) A, times the saved column norms of W
        a, b = t["delora_A"], t["delora_B"]
        diag = t["delora_lambda"] / a.shape[0] / (a.norm(dim=1).clamp(min=1e-4) * b.norm(dim=0).clamp(min=1e-4))
        return w + (b @ torch.diag(diag) @ a) * t["delora_w_norm"][None, :]
    if kind == "hira":  # W + W * (B A)
        return w + w * (t["hira_B"] @ t["hira_A"])
    if kind == "unilora":  # B A with A, B gathered from the shared theta by the saved index maps, scaled
        theta = saved["base_model.unilora_theta_d"].double()
        a = theta[t["unilora_indices_A"].long()] * t["unilora_scales_A"]
        b = theta[t["unilora_indices_B"].long()] * t["unilora_scales_B"]
        return w + b @ a
    if kind.startswith("supertuning"):  # values at flat indices (+ alpha / r * B A)
        out = w.reshape(-1).index_add(0, t["supertuning_indices"].long(), t["supertuning_values"]).reshape_as(w)
        if "supertuning_lora_A.weight" in t:
            out = out + config["lora_alpha"] / config["r"] * t["supertuning_lora_B.weight"] @ t["supertuning_lora_A.weight"]
        return out
    if kind == "shira":  # a sparse delta at the saved (row, column) indices
        rows, cols = t["shira_indices"].long()
        return w.index_put((rows, cols), t["shira_weight"], accumulate=True)
    if kind in ("vera", "pvera"):  # the shared projections, sliced to the layer (PVeRA: the means, 1st half)
        a, b = saved[f"base_model.{kind}_A"].double(), saved[f"base_model.{kind}_B"].double()
        out, cols = w.shape
        lambda_d = t[f"{kind}_lambda_d"][: b.shape[1]]
        return w + (t[f"{kind}_lambda_b"][:, None] * b[:out]) @ (lambda_d[:, None] * a[: b.shape[1], :cols])
    scale = config["alpha"] / config["r"]
    if kind == "loha":
        return w + scale * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return w + scale * torch.kron(w1, w2)


def glora_path(t: dict, name: str) -> torch.Tensor | float:
    """A GLoRA path's value as PEFT's forward() gives it."""
    if f"glora_{name}.Xd" in t:
        return t[f"glora_{name}.Xd"] @ t[f"glora_{name}.Xu"]
    if f"glora_{name}.X" in t:
        x = t[f"glora_{name}.X"]
        return x[0] if x.numel() == 1 else x
    return t[f"glora_{name}.zeros"]


def tinylora_v(saved: dict, config: dict, module: str) -> torch.Tensor:
    """The shared vector of a module: its index in the model's module order (layers in turn; in each,
    attention's q, k, v, o before the MLP's gate, up, down: Llama's and Qwen2's definition order)
    grouped by weight_tying as PEFT's TinyLoRA groups it."""
    order = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    names = sorted({k.removeprefix("base_model.model.").rsplit(".", 1)[0] for k in saved if k.endswith("tinylora_A")},
                   key=lambda m: (int(m.split(".")[2]), order.index(m.rsplit(".", 1)[1])))
    n = len(names)
    groups = max(1, round(n * (1 - config["weight_tying"])))
    group = min(names.index(module) // max(1, n // groups), groups - 1)
    return saved[f"base_model.tinylora_v.{group}"].double()


def waveft_delta(spectrum: torch.Tensor, config: dict, shape: tuple[int, int]) -> torch.Tensor:
    """WaveFT's delta in float64 from its definition: the spectrum at torch.randperm's locations, then
    (use_idwt) the one-level 2-D Haar synthesis: each output 2 x 2 block (2i, 2j) is
    [[a + b + c + d, a + b - c - d], [a - b + c - d, a - b - c + d]] / 2 from LL a, LH b (top right: its
    rows high-pass), HL c (bottom left: its columns high-pass), HH d (bottom right) at (i, j); sides padded to
    even (the weight first), cropped."""
    out, cols = shape
    flat = torch.randperm(out * cols, generator=torch.Generator().manual_seed(config["random_loc_seed"]))
    dense = torch.zeros(out * cols, dtype=torch.float64)
    dense[flat[: spectrum.shape[0]]] = spectrum
    dense = dense.view(out, cols)
    if not config["use_idwt"]:
        return dense * config["scaling"]
    if config["wavelet_family"] != "db1":  # PEFT's own synthesis (its waverec2d), on the same float64 spectrum
        return peft_waveft_synthesis(dense, config) * config["scaling"]
    padded = torch.zeros(out + out % 2, cols + cols % 2, dtype=torch.float64)
    padded[:out, :cols] = dense
    h, w = padded.shape[0] // 2, padded.shape[1] // 2
    a, b, c, d = padded[:h, :w], padded[:h, w:], padded[h:, :w], padded[h:, w:]
    result = torch.zeros_like(padded)
    result[0::2, 0::2], result[0::2, 1::2] = (a + b + c + d) / 2, (a + b - c - d) / 2
    result[1::2, 0::2], result[1::2, 1::2] = (a - b + c - d) / 2, (a - b - c + d) / 2
    return result[:out, :cols] * config["scaling"]


def peft_waveft_synthesis(dense: torch.Tensor, config: dict) -> torch.Tensor:
    """PEFT's get_delta_weight arithmetic for a family other than Haar, in float64."""
    from peft.tuners.waveft.constants import WAVELET_REDUCTIONS
    from peft.tuners.waveft.waverec2d import waverec2d

    out, cols = dense.shape
    extra_r, extra_c = WAVELET_REDUCTIONS[config["wavelet_family"]]
    tall, wide = out + extra_r, cols + extra_c
    tall, wide = tall + tall % 2, wide + wide % 2
    padded = torch.zeros(tall, wide, dtype=torch.float64)
    top, left = (tall - out) // 2, (wide - cols) // 2
    padded[top : top + out, left : left + cols] = dense
    h, w = tall // 2, wide // 2
    result = waverec2d((padded[:h, :w], (padded[:h, w:], padded[h:, :w], padded[h:, w:])), config["wavelet_family"])
    r0, c0 = (result.shape[0] - out) // 2, (result.shape[1] - cols) // 2
    return result[r0 : r0 + out, c0 : c0 + cols]


def fourier_delta(spectrum: torch.Tensor, config: dict, shape: tuple[int, int], magnitude: bool = False) -> torch.Tensor:
    """FourierFT's delta in float64 (numpy's FFT), or a bound on its terms' magnitude (every |cos| <= 1)."""
    import numpy as np

    out, cols = shape
    if magnitude:
        return torch.full(shape, config["scaling"] * float(spectrum.abs().sum()) / (out * cols), dtype=torch.float64)
    flat = torch.randperm(out * cols, generator=torch.Generator().manual_seed(config["random_loc_seed"]))
    flat = flat[: spectrum.shape[0]].numpy()
    dense = np.zeros(out * cols)
    dense[flat] = spectrum.numpy()
    return torch.from_numpy(np.fft.ifft2(dense.reshape(out, cols)).real * config["scaling"])


def from_weight_magnitude(kind: str, saved: dict, config: dict, module: str, w: torch.Tensor) -> torch.Tensor:
    """|W| + the magnitudes of DEFT's or PEANuT's terms (through PEANuT's network, each activation's
    slope at most 1.13): what float32 roundings are relative to, whatever cancels in the result."""
    t = {k.removeprefix(f"base_model.model.{module}."): v.double().abs() for k, v in saved.items()
         if k.startswith(f"base_model.model.{module}.")}
    if kind.startswith("deft"):
        q = torch.linalg.qr(t["deft_P"])[0].abs() if config["decomposition_method"] == "qr" else t["deft_P"]
        injected = t["deft_R"] * (config["alpha"] / q.shape[1] if config.get("alpha") else 1) if "deft_R" in t else 0
        return w.abs() + q @ (injected + q.T @ w.abs())
    h, residuals = 1.13 * w.abs().T @ t["peanut_A.weight"].T, []
    for i in range(config["depth"]):
        residuals.append(h)
        h = 1.13 * h @ t[f"peanut_encoders.{i}.weight"].T
    for i in range(config["depth"]):
        h = 1.13 * h @ t[f"peanut_decoders.{i}.weight"].T + residuals[config["depth"] - 1 - i]
    return w.abs() + config["scaling"] * t["peanut_B.weight"] @ h.T


def frod_merged(t: dict, saved: dict, module: str, w: torch.Tensor, magnitude: bool = False) -> torch.Tensor:
    """FRoD's merged weight in float64 (or its terms' magnitudes)."""
    parts = module.split(".")
    category = f"{parts[-2]}_{parts[-1]}"
    v = saved[f"base_model.frod_V.{category}"].double()
    idx = saved[f"base_model.frod_s_indices.{category}"]
    s = torch.zeros(*saved[f"base_model.frod_s_size.{category}"].tolist(), dtype=torch.float64)
    s.index_put_((idx[0], idx[1]), t["frod_lambda_s_values"], accumulate=True)
    bi = torch.linalg.solve(v, w.T).T
    u = bi / bi.norm(dim=0)
    core = s + torch.diag(t["frod_lambda_l"])
    return u.abs() @ core.abs() @ v.abs().T if magnitude else u @ core @ v.T


def oft_rotation(vec: torch.Tensor, config: dict, cols: int) -> torch.Tensor:
    """The (cols, cols) block-diagonal rotation of PEFT's OFT, float64: skew Q from the upper
    triangles, coft's projection, then Cayley-Neumann (PEFT's series) or the exact Cayley map."""
    b = int(round((1 + (1 + 8 * vec.shape[1]) ** 0.5) / 2))
    rows, columns = torch.triu_indices(b, b, 1)
    q = torch.zeros(vec.shape[0], b, b, dtype=torch.float64)
    q[:, rows, columns] = vec.double()
    q = q - q.transpose(1, 2)
    if config.get("coft"):
        eps = config["eps"] / vec.shape[0] ** 0.5
        norm = q.norm(dim=(1, 2), keepdim=True)
        q = torch.where(norm <= eps, q, eps * q / norm)
    eye = torch.eye(b, dtype=torch.float64).expand_as(q)
    if not config.get("use_cayley_neumann", True):
        r = torch.linalg.solve(eye + q, eye - q, left=False)
    else:
        t, r, power = config["num_cayley_neumann_terms"], eye.clone(), eye
        series = [2.0] * (t - 2) + [1.0] if t > 3 else [2.0, 2.0, 1.0] if t == 3 else [2.0] * (t - 1)
        for c in series:  # PEFT: I + 2Q + 2Q^2 + ... + Q^last
            power = power @ q
            r = r + c * power
    return torch.block_diag(*([r[0]] * (cols // b) if r.shape[0] == 1 else list(r)))


def hra_rotation(u: torch.Tensor, config: dict) -> torch.Tensor:
    """PEFT's HRA matrix in float64: the chain of reflections I - 2 u_i u_i^T (columns normalised), or
    I - 2 Q Q^T with Q the Gram-Schmidt orthonormalisation of u (apply_GS)."""
    u = u.double()
    if config.get("apply_GS"):
        q = []
        for i in range(u.shape[1]):
            v = u[:, i] - sum(((w @ u[:, i]) * w for w in q), torch.zeros(u.shape[0], dtype=torch.float64))
            q.append(v / v.norm())
        q = torch.stack(q, 1)
        return torch.eye(u.shape[0], dtype=torch.float64) - 2 * q @ q.T
    r, unit = torch.eye(u.shape[0], dtype=torch.float64), u / u.norm(dim=0)
    for i in range(u.shape[1]):
        r = r - 2 * r @ torch.outer(unit[:, i], unit[:, i])
    return r


def miss_merged(b: torch.Tensor, config: dict, w: torch.Tensor) -> torch.Tensor:
    """W merged with MiSS from its definition, float64: B^T added to every r-column block (mini: B
    repeated along the outputs), or (bat) each r x r block W_ij + W_ij @ B_i + B_i."""
    out, cols = w.shape
    if config["init_weights"] == "bat":
        r = b.shape[1]
        blocks = w.reshape(out // r, r, cols // r, r).permute(0, 2, 1, 3)  # (i, j, a, c)
        merged = blocks + blocks @ b[:, None] + b[:, None]
        return merged.permute(0, 2, 1, 3).reshape(out, cols)
    if config["init_weights"] == "mini":
        b = b.repeat(1, out // b.shape[1])
    r = b.shape[0]
    return w + b.T[:, torch.arange(cols) % r]


def randlora_delta(t: dict, saved: dict, config: dict, shape: tuple[int, int]) -> torch.Tensor:
    """PEFT's RandLoRA update from its definition: lambda and gamma scale the unique base on the smaller
    side, (update_B.T @ update_A.T).T with PEFT's pairing of the two flattenings, times alpha / r."""
    out, cols = shape
    a, b = saved["base_model.randlora_A"].double(), saved["base_model.randlora_B"].double()
    lam, gamma = t["randlora_lambda"], t["randlora_gamma"]
    small, large, bases = min(out, cols), max(out, cols), gamma.shape[0]
    update_a = (lam[:, :, None] * a[:, :bases, :small] * gamma[None]).flatten(end_dim=1)
    update_b = b[:large, :bases, :].flatten(start_dim=1)
    first, second = (update_a, update_b) if small == cols else (update_b.T, update_a.T)
    return (first.T @ second.T).T * config["randlora_alpha"] / config["r"]


def vblora_delta(t: dict, saved: dict, config: dict) -> torch.Tensor:
    """VB-LoRA's B @ A in float64: per side the top-k logits' softmax (or the saved k - 1 weights and
    the remainder) weighting bank vectors; A's tiles along its rows, B's along its columns."""
    bank, k = saved["base_model.vblora_vector_bank"].double(), config["topk"]

    def side(name: str) -> torch.Tensor:
        if name in t:
            values, indices = t[name].topk(k, dim=-1)
            weights = torch.softmax(values, dim=-1)
        else:
            indices, weights = t[name + "_topk_indices"].long(), t[name + "_topk_weights"]
            weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
        return torch.einsum("...k,...kl->...l", weights, bank[indices])

    a, b = side("vblora_logits_A"), side("vblora_logits_B")
    return b.transpose(1, 2).reshape(-1, b.shape[1]) @ a.reshape(a.shape[0], -1)


def boft_rotation(r: torch.Tensor) -> torch.Tensor:
    """PEFT's one-factor BOFT matrix in float64: block_diag of solve(I + S, I - S, left=False), S = (B - B^T)/2."""
    skew = 0.5 * (r[0] - r[0].transpose(1, 2))
    eye = torch.eye(skew.shape[-1], dtype=torch.float64).expand_as(skew)
    return torch.block_diag(*torch.linalg.solve(eye + skew, eye - skew, left=False))


def one_rounding(exact: torch.Tensor, got: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """|got - exact| within half a bf16 ulp of exact plus a float32 arithmetic bound (32 roundings)."""
    _, e = torch.frexp(exact)
    half_ulp = torch.ldexp(torch.ones_like(exact), e - 9)  # bf16: 8 significant bits
    return bool(((got.double() - exact).abs() <= half_ulp + 32 * 2.0**-24 * magnitude + 1e-30).all())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_method_merges_like_peft(tmp_path: Path, bases: dict, arch: str, kind: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from streammerge.run import workingset

    monkeypatch.setattr(workingset, "MAX_CHUNK", 1000)  # chunks of ~15 rows (RoAd: whole groups of paired rows)
    base = bases[arch]
    adapter, peft_merged = make_adapter(base, tmp_path / "adapter", kind)
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q", "--max-mem", "40MB"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    saved, config = load_file(adapter / "adapter_model.safetensors"), json.loads((adapter / "adapter_config.json").read_text())
    assert set(got) == set(ref)
    modules = {m for m in (n.rpartition(".")[0] for n in ref) if any(k.startswith(f"base_model.model.{m}.") for k in saved)}
    changed = 0
    for name, tensor in got.items():
        module, _, param = name.rpartition(".")
        if module in modules and (param == "weight" or (kind.startswith(("ia3", "glora")) and param == "bias")):
            w = ref[name]
            if kind.startswith("glora") and param == "bias":  # bias + bias * D + E + W0 @ C
                t = {k.removeprefix(f"base_model.model.{module}."): v.double() for k, v in saved.items()
                     if k.startswith(f"base_model.model.{module}.")}
                w0, b = ref[f"{module}.weight"].double(), w.double()
                exact = b + b * glora_path(t, "D") + glora_path(t, "E") + (w0 @ glora_path(t, "C")).reshape(-1)
                assert one_rounding(exact, tensor, b.abs() * 4 + (w0.abs() @ glora_path(
                    {k: v.abs() for k, v in t.items()}, "C")).reshape(-1) + 1), name
                changed += 1
                continue
            exact = formula(kind, saved, config, module, w if param == "weight" else w[:, None])
            exact = exact if param == "weight" else exact[:, 0]
            if kind.startswith("oft"):  # |W| @ |R|^T
                rotation = oft_rotation(saved[f"base_model.model.{module}.oft_R.weight"], config, w.shape[1])
                magnitude = w.double().abs() @ rotation.abs().T
            elif kind.startswith("road"):  # |R| @ |W|
                from peft.tuners.road.layer import _get_delta_weight

                t = {x: saved[f"base_model.model.{module}.road_{x}"].double() for x in ("theta", "alpha")}
                magnitude = _get_delta_weight(config["variant"], config["group_size"], t["theta"], t["alpha"]).abs() @ w.double().abs()
            elif kind == "boft":  # |W| @ |R|^T * |s|
                magnitude = (w.double().abs() @ boft_rotation(saved[f"base_model.model.{module}.boft_R"].double()).abs().T
                             * saved[f"base_model.model.{module}.boft_s"].double().abs())
            elif kind.startswith("waveft"):
                magnitude = w.double().abs() + waveft_delta(saved[f"base_model.model.{module}.waveft_spectrum"].double()
                                                            .abs(), {**config, "use_idwt": False}, w.shape).abs() * 4
            elif kind == "fourierft":
                magnitude = w.double().abs() + fourier_delta(saved[f"base_model.model.{module}.fourierft_spectrum"].double(),
                                                             config, w.shape, magnitude=True)
            elif kind == "osf":  # a float32 SVD's reconstruction: about eps * ||W||_2 in every element
                magnitude = torch.full_like(exact, float(torch.linalg.matrix_norm(w.double(), 2)) * 4)
            elif kind == "frod":
                magnitude = frod_merged({k.removeprefix(f"base_model.model.{module}."): v.double() for k, v in saved.items()},
                                        saved, module, w.double(), magnitude=True)
            elif kind.startswith(("deft", "peanut")):  # |W| + the delta's terms
                magnitude = from_weight_magnitude(kind, saved, config, module, w.double())
            elif kind.startswith("hra"):  # |W| @ |R|
                magnitude = w.double().abs() @ hra_rotation(saved[f"base_model.model.{module}.hra_u"], config).abs()
            else:  # the same formula on magnitudes
                magnitude = formula(kind, {k: v.abs() for k, v in saved.items()}, config, module,
                                    w.abs() if param == "weight" else w.abs()[:, None])
                magnitude = magnitude if param == "weight" else magnitude[:, 0]
            assert one_rounding(exact, tensor, magnitude.abs()), name
            peft32 = peft_merged[name].double()  # PEFT's own merge, float32: the same within bf16's rounding
            assert (tensor.double() - peft32).abs().le(peft32.abs() * 2.0**-8 + 1e-6).all(), name
            changed += 1
        else:
            assert torch.equal(bits(tensor), bits(ref[name])), name
    # q/k/v biases of both layers (Qwen2): IA3 scales its k and v (both target output sides), GLoRA changes
    # q's and v's (D, E and W0 @ C) unless its paths for them are zeros
    biases = 4 if arch == "qwen2" and (kind == "ia3" or kind in ("glora", "glora-vectors", "glora-constants")) else 0
    assert changed == 2 * 3 + biases
    if biases:
        assert all(not torch.equal(got[n], ref[n]) for n in got if n.endswith(".bias") and n[:-5] in modules)
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("first", ["lora", "ia3"])
def test_ia3_composes_with_lora_in_the_order_given(tmp_path: Path, bases: dict, first: str, capsys) -> None:
    """LoRA then IA3: (W + s B A) * l; IA3 then LoRA: W * l + s B A. The plan says the order matters."""
    from oracle import build_adapter

    base = bases["llama"]
    ia3, _ = make_adapter(base, tmp_path / "ia3", "ia3")
    lora = build_adapter(base, tmp_path / "lora", dtype="bf16", target_modules=["k_proj", "q_proj"], r=4, lora_alpha=8)
    order = [str(lora.adapter), str(ia3)] if first == "lora" else [str(ia3), str(lora.adapter)]
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", order[0], "--adapter", order[1], "--output", str(out)]) == 0
    assert "take a multiplicative method (IA3) and other deltas" in capsys.readouterr().out
    got, ref, saved = read_checkpoint(out), read_checkpoint(base), load_file(ia3 / "adapter_model.safetensors")
    for layer in range(2):
        name = f"model.layers.{layer}.self_attn.k_proj.weight"
        (a, b, s), = lora.deltas[name.removesuffix(".weight")]
        l = saved[f"base_model.model.{name.removesuffix('.weight')}.ia3_l"].double()  # noqa: E741
        w = ref[name].double()
        exact = (w + s * b @ a) * l if first == "lora" else w * l + s * b @ a
        magnitude = (w.abs() + s * b.abs() @ a.abs()) * l.abs()
        assert one_rounding(exact, got[name], magnitude), name
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("config, said", [
    ({"peft_type": "NOT_A_TYPE"}, "peft_type 'NOT_A_TYPE' is not mergeable by streammerge (LORA, ADALORA, BEFT, BOFT, "
                                  "C3A, DEFT, DELORA, FOURIERFT, FROD, GLORA, GRALORA, HIRA, HRA, IA3, LN_TUNING, LOHA, "
                                  "LOKR, MISS, OFT, OSF, PEANUT, PVERA, RANDLORA, ROAD, SHIRA, SUPERTUNING, TINYLORA, "
                                  "UNILORA, VBLORA, VERA and WAVEFT are)"),
    ({"peft_type": "PSOFT", "r": 4}, "is not merged by streammerge: its delta is rebuilt at load time from a float32 SVD "
                                     "of the base weight"),
    ({"peft_type": "IA3", "fan_in_fan_out": True, "target_modules": ["c_attn"]},
     "IA3 with fan_in_fan_out (Conv1D layers, GPT-2 style) is not merged"),
    ({"peft_type": "VERA", "r": 8, "save_projection": False}, "VERA saved with save_projection=false"),
    ({"peft_type": "PREFIX_TUNING"}, "is key/value prefixes added to every attention layer at run time, not a change "
                                     "of the weights: there is nothing to merge"),
    ({"peft_type": "XLORA"}, "a classifier mixing LoRA experts per token at run time"),
    ({"config": {"reduction_factor": 16, "non_linearity": "relu"}, "name": "sst"},
     "is an AdapterHub bottleneck adapter: it adds layers to the model"),
], ids=["unknown-type", "psoft", "ia3-conv1d", "vera-no-projection", "prefix-tuning", "xlora", "adapterhub"])
def test_methods_not_merged_are_refused_by_name(tmp_path: Path, bases: dict, config: dict, said: str, capsys) -> None:
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.ones(32, 1)},
              adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert main(["--base", str(bases["llama"]), "--adapter", str(adapter), "--output", str(out)]) != 0
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("family", ["db1", "db2", "db4", "sym3", "coif1", "coif3"])
@pytest.mark.parametrize("shape", [(5, 7), (6, 9), (16, 12)])
def test_waveft_synthesis_is_peft_s_own_delta(shape: tuple[int, int], family: str) -> None:
    """Odd sides too (PEFT pads the spectrum by the filter length, to even sides, centred, and crops):
    a WaveFT layer made by PEFT on a Linear of that shape, its get_delta_weight against streammerge's
    sparse entries."""
    from streammerge.deltas.locations import randperm_prefix
    from streammerge.deltas.spectral import synthesis_entries, wavelet_filters

    out, cols = shape
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(cols, out, bias=False))
    model = peft.get_peft_model(model, peft.WaveFTConfig(n_frequency=12, scaling=1.0, random_loc_seed=9,
                                                         wavelet_family=family, target_modules=["proj"]))
    layer = model.base_model.model.proj
    torch.manual_seed(1)
    layer.waveft_spectrum["default"].data = torch.randn(12)
    want = layer.get_delta_weight("default").double()
    flat = torch.from_numpy(randperm_prefix(out * cols, 12, 9))
    r, c, x = synthesis_entries(flat // cols, flat % cols, layer.waveft_spectrum["default"].detach().double(), out,
                                cols, wavelet_filters(family))
    got = torch.zeros(out, cols, dtype=torch.float64).index_put_((r, c), x, accumulate=True)
    assert torch.allclose(got, want, atol=1e-6), (got, want)


def test_wavelet_taps_read_are_peft_s() -> None:
    """The families read take their taps from PyWavelets: equal to PEFT's own table (coif4 and coif5,
    where PEFT's differ, are refused)."""
    from peft.tuners.waveft.waverec2d import _as_wavelet

    from streammerge.deltas.spectral import wavelet_filters

    families = ["db1", "haar", *(f"db{i}" for i in range(2, 11)), *(f"sym{i}" for i in range(2, 11)), "coif1", "coif2",
                "coif3"]
    for family in families:
        lo, hi = wavelet_filters(family)
        theirs = _as_wavelet(family)
        assert torch.allclose(torch.tensor(lo, dtype=torch.float64), torch.tensor(theirs.rec_lo, dtype=torch.float64), atol=1e-10), family
        assert torch.allclose(torch.tensor(hi, dtype=torch.float64), torch.tensor(theirs.rec_hi, dtype=torch.float64), atol=1e-10), family


@pytest.mark.parametrize("family, said", [("coif4", "PEFT's own filters for it are not PyWavelets'"),
                                          ("db12", "db1-db10, sym2-sym10 and coif1-coif3 are read"),
                                          ("sym4", "pip install 'streammerge[wavelets]'")])
def test_waveft_families_not_read_are_refused(tmp_path: Path, bases: dict, family: str, said: str, capsys,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """coif4 / coif5 (PEFT's taps are not PyWavelets'), families PEFT lists but has no taps for, and any
    family but Haar without PyWavelets installed: one line, nothing written."""
    import sys

    from safetensors.torch import save_file

    if family == "sym4":
        monkeypatch.setitem(sys.modules, "pywt", None)  # (as if PyWavelets were not installed)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "WAVEFT", "wavelet_family": family,
                                                             "scaling": 1.0, "random_loc_seed": 1, "use_idwt": True}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.waveft_spectrum": torch.ones(8)},
              adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert main(["--base", str(bases["llama"]), "--adapter", str(adapter), "--output", str(out)]) != 0
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1 and not out.exists()


def adalora_adapter(base: Path, out: Path) -> Path:
    """An AdaLoRA adapter pruned by PEFT itself: a few training steps of update_and_allocate make its
    rank_pattern (the format), every tensor is then randomised, and the masks are set to a known mix
    before PEFT saves (and prunes) it: one module cut to rank 0, one to 3 of 6, the rest kept whole."""
    import transformers

    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=10, tinit=1, tfinal=1, deltaT=1, lora_alpha=8,
                                target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(8):
        ids = torch.randint(0, 160, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        model.base_model.update_and_allocate(step)
        optimizer.step()
        optimizer.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    assert pattern, "PEFT made no rank_pattern"
    for i, key in enumerate(sorted(pattern)):
        pattern[key] = [False] * 6 if i == 0 else [True, False, True, False, True, False] if i == 1 else [True] * 6
    for p in (p for n, p in model.named_parameters() if "lora_" in n):
        p.data = 0.3 * torch.randn_like(p)
    model.save_pretrained(out)
    return out


def test_adalora_merges_like_peft_loads_it(tmp_path: Path, bases: dict) -> None:
    import transformers

    base = bases["llama"]
    adapter = adalora_adapter(base, tmp_path / "adapter")
    saved, config = load_file(adapter / "adapter_model.safetensors"), json.loads((adapter / "adapter_config.json").read_text())
    kept = {k.removeprefix("base_model.model.").removesuffix(".lora_A"): v.shape[0] for k, v in saved.items()
            if k.endswith("lora_A")}
    assert 0 in kept.values() and 3 in kept.values() and 6 in kept.values()  # pruned to 0, cut, kept whole
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                            adapter)
    peft_merged = loaded.merge_and_unload().state_dict()
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    scale = config["lora_alpha"] / (config["init_r"] + 1e-5)  # ranknum is init_r, whatever rank was kept
    for name, tensor in got.items():
        module = name.removesuffix(".weight")
        if kept.get(module):
            a, b, e = (saved[f"base_model.model.{module}.lora_{x}"].double() for x in "ABE")
            w = ref[name].double()
            exact, magnitude = w + scale * b @ (a * e), w.abs() + scale * b.abs() @ (a * e).abs()
            assert one_rounding(exact, tensor, magnitude), name
            peft32 = peft_merged[name].double()
            assert (tensor.double() - peft32).abs().le(peft32.abs() * 2.0**-8 + 1e-6).all(), name
        else:  # untouched, or pruned to rank 0
            assert torch.equal(bits(tensor), bits(ref[name])), name
    assert main(["verify", str(out)]) == 0


def test_a_reft_intervention_is_refused_by_name(tmp_path: Path, bases: dict, capsys) -> None:
    reft = tmp_path / "reft"
    reft.mkdir()
    (reft / "config.json").write_text(json.dumps({"intervention_types": ["LoreftIntervention"], "representations": []}))
    assert main(["--base", str(bases["llama"]), "--adapter", str(reft), "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "is a ReFT (pyreft) intervention: it edits hidden representations at run time" in err
    assert not (tmp_path / "out").exists()


def test_ln_tuning_replaces_the_norms(tmp_path: Path, bases: dict) -> None:
    """LN tuning trains the norms themselves: the saved tensors replace the base's, bit for bit."""
    import transformers

    base = bases["qwen2"]
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                peft.LNTuningConfig(target_modules=["input_layernorm", "norm"]))
    for p in (p for p in model.parameters() if p.requires_grad):
        p.data = torch.randn_like(p)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    replaced = {k.removeprefix("base_model.model.").replace(".ln_tuning_layers.", "."): v for k, v in saved.items()}
    assert len(replaced) == 3  # two layers' input norms and the final norm
    for name, tensor in got.items():
        assert torch.equal(bits(tensor), bits(replaced.get(name, ref[name]))), name
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("kind", ["loha", "ia3"])
def test_a_vlm_merges_additive_and_multiplicative_methods(tmp_path: Path, kind: str) -> None:
    """LLaVA (its on-disk names differ from PEFT's in-memory ones): LoHa (additive) and IA3
    (multiplicative) on both towers' projections, against PEFT's merge saved by transformers."""
    import transformers
    from test_multimodal import llava

    torch.manual_seed(0)
    model = llava().to(torch.bfloat16)
    base = tmp_path / "base"
    model.save_pretrained(base)
    config = (peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False) if kind == "loha"
              else peft.IA3Config(target_modules=["q_proj", "v_proj", "fc2"], feedforward_modules=["fc2"],
                                  init_ia3_weights=False))
    tuned = peft.get_peft_model(type(model).from_pretrained(base, dtype=torch.float32), config)
    for name, p in tuned.named_parameters():
        if p.requires_grad:
            p.data = (1 + 0.5 * torch.randn_like(p)) if "ia3_l" in name else 0.3 * torch.randn_like(p)
    tuned.save_pretrained(tmp_path / "adapter")
    tuned.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q"]) == 0
    ours, theirs, ref = read_checkpoint(out), read_checkpoint(tmp_path / "peft-merged"), read_checkpoint(base)
    assert set(ours) == set(theirs)
    changed = 0
    for name, t in theirs.items():
        if torch.equal(bits(ours[name]), bits(ref[name])) and torch.equal(t.to(torch.bfloat16), ref[name]):
            continue  # untouched by both
        changed += 1
        assert (ours[name].double() - t.double()).abs().le(t.double().abs() * 2.0**-8 + 1e-6).all(), name
    assert changed == (6 if kind == "loha" else 7)  # q, v of 2 text and 1 vision layers (+ the vision fc2)
    assert any("vision" in n for n in theirs if not torch.equal(bits(ours[n]), bits(ref[n])))
    assert main(["verify", str(out)]) == 0
    transformers.AutoConfig.from_pretrained(out)  # (loads as the same architecture)


def test_beft_adds_to_the_biases(tmp_path: Path, bases: dict) -> None:
    """BEFT trains a bias offset: Qwen2's q/k biases gain it, nothing else changes."""
    import transformers

    base = bases["qwen2"]
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                peft.BeftConfig(target_modules=["q_proj", "k_proj"]))
    for p in (p for p in model.parameters() if p.requires_grad):
        p.data = 0.3 * torch.randn_like(p)
    model.save_pretrained(tmp_path / "adapter")
    peft_merged = model.merge_and_unload().state_dict()
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q"]) == 0
    got, ref = read_checkpoint(out), read_checkpoint(base)
    offsets = {k.removeprefix("base_model.model.").replace(".beft_bias", ".bias"): v.reshape(-1).double()
               for k, v in saved.items()}
    assert len(offsets) == 4
    for name, tensor in got.items():
        if name in offsets:
            exact = ref[name].double() + offsets[name]
            assert one_rounding(exact, tensor, ref[name].double().abs() + offsets[name].abs()), name
            assert (tensor.double() - peft_merged[name].double()).abs().le(exact.abs() * 2.0**-8 + 1e-6).all(), name
        else:
            assert torch.equal(bits(tensor), bits(ref[name])), name
    assert main(["verify", str(out)]) == 0


def test_mixed_methods_in_one_pass_match_separate_runs(tmp_path: Path, bases: dict) -> None:
    """Two outputs in one pass, an IA3 and a LoHa adapter: each byte-identical to its own run."""
    base = bases["qwen2"]
    ia3, _ = make_adapter(base, tmp_path / "ia3", "ia3")
    loha, _ = make_adapter(base, tmp_path / "loha", "loha")
    assert main(["--base", str(base), "--adapter", str(ia3), "--output", str(tmp_path / "both-ia3"),
                 "--adapter", str(loha), "--output", str(tmp_path / "both-loha"), "-q"]) == 0
    for name, adapter in (("ia3", ia3), ("loha", loha)):
        assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / f"alone-{name}"), "-q"]) == 0
        together, alone = read_checkpoint(tmp_path / f"both-{name}"), read_checkpoint(tmp_path / f"alone-{name}")
        assert set(together) == set(alone) and all(torch.equal(bits(together[n]), bits(alone[n])) for n in alone), name


@pytest.mark.parametrize("kind", ["ia3", "loha", "oft", "fourierft", "waveft", "peanut"])
def test_an_untrained_adapter_of_another_method_is_refused(tmp_path: Path, bases: dict, kind: str, capsys) -> None:
    """PEFT's own initialisation (IA3 all ones, LoHa with a zero factor, OFT with zero rotations, FourierFT's
    (init_weights=True) and WaveFT's zero spectra, PEANuT's zero B): an identity, refused as the untrained LoRA is, unless
    --allow-noop; a trained one is merged."""
    import transformers

    base = bases["llama"]
    config = {"ia3": peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
              "loha": peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]),
              "oft": peft.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"]),
              "fourierft": peft.FourierFTConfig(n_frequency=20, init_weights=True, target_modules=["q_proj"]),
              "waveft": peft.WaveFTConfig(n_frequency=20, target_modules=["q_proj"]),
              "peanut": peft.PeanutConfig(r=4, target_modules=["q_proj"])}[kind]
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) != 0
    assert "changes nothing (every module is an identity as saved" in capsys.readouterr().err and not out.exists()
    assert main(["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(out), "-q",
                 "--allow-noop"]) == 0
    trained, _ = make_adapter(base, tmp_path / "trained", kind)
    assert main(["--base", str(base), "--adapter", str(trained), "--output", str(tmp_path / "t"), "-q"]) == 0
