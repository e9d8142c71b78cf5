"""GGUF output in the same pass (issue 14, first part): held against llama.cpp's own converter.

The reference is ``convert_hf_to_gguf.py`` with the gguf-py vendored beside it, taken from the
llama-cpp-python 0.3.36 sdist (fetched from the package registry once per session, ~76 MB, its
sha256 checked; the tests are skipped, saying so, when the registry cannot be reached), run on streammerge's safetensors output of the same merge.
Tensor names, types, shapes and bytes must be identical, and every metadata value but the
descriptive general.name / size_label / tags. Bases: tiny Llama (q / k rows permuted by the
converter) and Qwen2 (biases), bf16, with a SentencePiece tokenizer trained here with identity
normalisation; a LoRA adapter made by PEFT with non-zero B.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_ref import CHAT_TEMPLATE, convert, read, same_file, with_bpe_tokenizer, with_tokenizer
from oracle import build_adapter, build_base

from streammerge.cli import main

pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def merges(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    """Per architecture: the base, a LoRA adapter on every linear layer, and their merged safetensors
    (what the reference converter converts)."""
    root = tmp_path_factory.mktemp("gguf")
    made = {}
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        base = with_tokenizer(build_base(arch, root / arch, dtype="bf16", sharded=True), root)
        adapter = build_adapter(base, root / f"{arch}-lora", dtype="bf16", r=4, lora_alpha=8).adapter
        merged = root / f"{arch}-merged"
        assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(merged), "-q"]) == 0
        made[arch] = base, adapter, merged
    return made


@pytest.fixture(scope="module")
def reference(merges: dict, converter: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The reference converter's file of an architecture's merged checkpoint in a type, made once."""
    made: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("reference")

    def get(arch: str, outtype: str) -> Path:
        if (arch, outtype) not in made:
            made[arch, outtype] = convert(converter, merges[arch][2], outtype, root / f"{arch}-{outtype}.gguf")
        return made[arch, outtype]

    return get


@pytest.mark.parametrize("arch, dtype", [("llama", "f32"), ("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"),
                                         ("llama", "auto"), ("mistral", "q8_0"), ("qwen2", "q8_0"), ("qwen3", "q8_0"),
                                         ("gemma", "q8_0"), ("gemma", "f32")])
def test_gguf_is_the_reference_converters(tmp_path: Path, merges: dict, converter: Path, reference, arch: str,
                                          dtype: str) -> None:
    base, adapter, _ = merges[arch]
    ours = tmp_path / "ours.gguf"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(ours), "--dtype", dtype, "-q"]) == 0
    assert not ours.with_name("ours.gguf.partial").exists()
    kv = same_file(ours, reference(arch, dtype), converter)  # names, types, shapes, bytes (sha256), metadata
    assert kv.get("tokenizer.chat_template") == CHAT_TEMPLATE  # (from chat_template.jinja)
    types = {v[0] for v in read(ours, converter)[1].values()}
    want = {"q8_0": {"F32", "Q8_0", "F16"}, "f32": {"F32"}, "auto": {"F32", "BF16"}}.get(dtype, {"F32", dtype.upper()})
    assert types == want  # (auto: the checkpoint is BF16)


@pytest.mark.parametrize("dtype", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_gguf_small_types_are_gguf_s_own_quantization(tmp_path: Path, merges: dict, converter: Path, reference,
                                                       dtype: str) -> None:
    """Types the converter does not write: the reference's f32 file of the same merge, each tensor
    quantized by the reference's own gguf-py (row-chunk invariant: blocks of 32 along the rows) to the
    type streammerge chose, must give streammerge's bytes; the choice follows the converter's rules
    (F32 for 1-D tensors and norms, the type where 32 divides the row, else F16)."""
    base, adapter, _ = merges["llama"]
    ours, ref = tmp_path / "ours.gguf", reference("llama", "f32")
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(ours), "--dtype", dtype, "-q"]) == 0
    code = (f"import sys, json, hashlib; sys.path.insert(0, {str(converter / 'gguf-py')!r})\n"
            "import numpy as np; from gguf import GGUFReader, GGMLQuantizationType as Q; from gguf.quants import quantize\n"
            f"ours, ref = GGUFReader({str(ours)!r}), GGUFReader({str(ref)!r})\n"
            "r = {t.name: t for t in ref.tensors}\n"
            "out = {}\n"
            "for t in ours.tensors:\n"
            "    x = np.asarray(r[t.name].data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])\n"
            "    out[t.name] = [t.tensor_type.name, hashlib.sha256(quantize(x, t.tensor_type).tobytes()).hexdigest() "
            "== hashlib.sha256(t.data.tobytes()).hexdigest(), len(t.shape)]\n"
            "print(json.dumps(out))")
    done = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert all(same for _, same, _ in done.values()), done
    for name, (qtype, _, dims) in done.items():
        want = "F32" if dims == 1 or name.endswith("_norm.weight") else "F16" if "ffn_down" in name else dtype.upper()
        assert qtype == want, (name, qtype)


def bpe_qwen2(root: Path) -> tuple[Path, Path, Path]:
    """Qwen2 with a home-made BPE tokenizer.json (tokenizers' trainer; an added special token and an
    added normal one), a LoRA, and their merged safetensors."""
    base = with_bpe_tokenizer(build_base("qwen2", root / "qwen2-bpe", dtype="bf16", sharded=False))
    adapter = build_adapter(base, root / "qwen2-bpe-lora", dtype="bf16", r=4, lora_alpha=8).adapter
    merged = root / "qwen2-bpe-merged"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(merged), "-q"]) == 0
    return base, adapter, merged


def test_gguf_bpe_tokenizer_is_the_reference_converters(tmp_path: Path, converter: Path) -> None:
    """A BPE tokenizer.json (tokenizer.ggml.model gpt2, merges, added tokens typed CONTROL / USER_DEFINED,
    padding to vocab_size): its fingerprint is no model's, so streammerge refuses it without --gguf-pre
    and takes the name with it; the reference converter, which raises on an unknown fingerprint, is
    run with its fingerprint lookup answering the same name."""
    base, adapter, merged = bpe_qwen2(tmp_path)
    ours = tmp_path / "ours.gguf"
    args = ["--base", str(base), "--adapter", str(adapter), "--output", str(ours), "--dtype", "q8_0", "-q"]
    assert main(args) != 0 and not ours.exists()
    assert main([*args, "--gguf-pre", "qwen2"]) == 0
    kv_ours = same_file(ours, convert(converter, merged, "q8_0", tmp_path / "ref.gguf", pre="qwen2"), converter)
    assert kv_ours["tokenizer.ggml.model"] == "gpt2" and kv_ours["tokenizer.ggml.merges"]
    types = dict(zip(kv_ours["tokenizer.ggml.tokens"], kv_ours["tokenizer.ggml.token_type"]))
    assert types["<|endoftext|>"] == 3 and types["<extra>"] == 4 and types["[PAD159]"] == 5


def test_gguf_beside_a_safetensors_output_in_one_pass(tmp_path: Path, merges: dict) -> None:
    """One read of the base, two outputs: a safetensors directory and a GGUF file, each byte for byte
    what its own run writes (a second adapter weight makes the two merges differ)."""
    import hashlib

    base, adapter, merged = merges["qwen2"]
    both_dir, both_gguf, alone = tmp_path / "both", tmp_path / "both.gguf", tmp_path / "alone.gguf"
    assert main(["--base", str(base), "--adapter", f"{adapter}:0.5", "--output", str(both_gguf),
                 "--adapter", str(adapter), "--output", str(both_dir), "--dtype", "q8_0", "-q"]) != 0  # (q8_0: GGUF only)
    assert main(["--base", str(base), "--adapter", f"{adapter}:0.5", "--output", str(both_gguf),
                 "--adapter", str(adapter), "--output", str(both_dir), "-q"]) == 0
    assert main(["--base", str(base), "--adapter", f"{adapter}:0.5", "--output", str(alone), "-q"]) == 0
    assert both_gguf.read_bytes() == alone.read_bytes()
    digest = lambda d: {f.name: hashlib.sha256(f.read_bytes()).hexdigest()  # noqa: E731
                        for f in d.glob("*.safetensors")}
    assert digest(both_dir) == digest(merged) and digest(both_dir)


def test_gguf_refusals(tmp_path: Path, merges: dict, capsys) -> None:
    base, adapter, _ = merges["llama"]
    taken = tmp_path / "taken.gguf"
    taken.write_bytes(b"x")
    for args, said in [
        (["--output", str(taken), "--dtype", "q8_0"], "exists; pass --overwrite"),
        (["--output", str(tmp_path / "dir"), "--dtype", "q8_0"], "is a GGUF type: give an --output ending in .gguf"),
        (["--output", str(tmp_path / "x.gguf"), "--dtype", "fp8"], "is not a GGUF type this version writes"),
    ]:
        assert main(["--base", str(base), "--adapter", str(adapter), *args]) != 0
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert taken.read_bytes() == b"x" and not (tmp_path / "dir").exists() and not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype", [("llama", "f32"), ("qwen2", "f32"), ("llama", "q8_0")])
def test_llama_cpp_runs_the_gguf(tmp_path: Path, merges: dict, arch: str, dtype: str) -> None:
    """llama.cpp itself (llama-cpp-python, built from source: ``pip install llama-cpp-python==0.3.36``,
    15-35 min on 2 cores) loads the file; its logits for a token sequence, with an f32 KV cache, are
    transformers' logits of the merged safetensors model (f32: within 1e-4; q8_0: the same argmax)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    import torch
    import transformers

    base, adapter, merged = merges[arch]
    ours = tmp_path / "ours.gguf"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(ours), "--dtype", dtype, "-q"]) == 0
    tokens = [1, 5, 17, 42, 99, 3, 120, 64, 7, 150]
    model = llama_cpp.Llama(str(ours), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2)
    model.eval(tokens)
    got = np.array(model.scores[: len(tokens)], dtype=np.float64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        want = hf(torch.tensor([tokens])).logits[0].double().numpy()
    print(f"{arch} {dtype}: max |logit difference| {np.abs(got - want).max():.3g}, max |logit| {np.abs(want).max():.3g}, "
          f"argmax agreement {(got.argmax(-1) == want.argmax(-1)).mean():.2f}")
    if dtype == "f32":
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    else:
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_plan_shows_the_gguf_file_a_merge_writes(tmp_path: Path, merges: dict, converter: Path, capsys) -> None:
    """``plan --output FILE.gguf``: each tensor's GGUF name, type and shape and the file's size, as the
    merge then writes them (read back with the reference's reader); nothing written by the plan; a
    tokenizer the GGUF cannot take is refused by the plan, in one line."""
    base, adapter, _ = merges["qwen2"]
    ours = tmp_path / "ours.gguf"
    args = ["--base", str(base), "--adapter", str(adapter), "--output", str(ours), "--dtype", "q4_1"]
    assert main(["plan", *args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["gguf"]
    assert not ours.exists() and not ours.with_name("ours.gguf.partial").exists()
    assert main([*args, "-q"]) == 0
    assert doc["bytes"] == ours.stat().st_size
    tensors = read(ours, converter)[1]
    assert {t["name"]: [t["type"], t["shape"][::-1]] for t in doc["tensors"]} == \
        {n: [v[0], v[1]] for n, v in tensors.items()}
    assert main(["plan", *args[:-4], "--output", str(tmp_path / "x.gguf"), "--dtype", "q8_0"]) == 0
    assert "gguf " in capsys.readouterr().out
    bpe = with_bpe_tokenizer(build_base("llama", tmp_path / "bpe", dtype="bf16", sharded=False))
    assert main(["plan", "--base", str(bpe), "--adapter", str(adapter), "--output", str(tmp_path / "y.gguf")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gguf-pre NAME" in err[0], err


@pytest.mark.parametrize("arch, dtype", [("llama", "q8_0"), ("llama", "q4_0"), ("llama", "f16"), ("qwen2", "q5_1"),
                                         ("gemma", "f32"), ("mistral", "q4_1"), ("qwen3", "q5_0")])
def test_verify_reads_the_gguf_back(tmp_path: Path, merges: dict, arch: str, dtype: str, capsys) -> None:
    """``verify`` of a GGUF: the layout, then sampled rows dequantized by gguf against the float64 merge
    (q / k rows found through the converter's permutation, Gemma's norms as 1 + w). A file of another
    merge (the adapter at weight 0.5) and a file of another base are told apart."""
    base, adapter, _ = merges[arch]
    ours, half = tmp_path / "ours.gguf", tmp_path / "half.gguf"
    for out, spec in ((ours, str(adapter)), (half, f"{adapter}:0.5")):
        assert main(["--base", str(base), "--adapter", spec, "--output", str(out), "--dtype", dtype, "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", "--base", str(base), "--adapter", str(adapter), str(ours), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    every = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert doc["ok"] and doc["kind"] == "gguf" and doc["tensors_sampled"] == len(every)
    assert main(["verify", "--base", str(base), "--adapter", str(adapter), str(half)]) == 7
    assert "DIFFERS: " in capsys.readouterr().out
    other = merges["qwen3" if arch != "qwen3" else "llama"][0]
    assert main(["verify", "--base", str(other), "--adapter", str(adapter), str(ours)]) != 0
    capsys.readouterr()
    assert main(["verify", str(ours)]) != 0  # (no manifest: the inputs must be named)
    assert "give --base and --adapter" in capsys.readouterr().err


def test_a_second_run_on_the_same_gguf_is_refused(tmp_path: Path, merges: dict, capsys) -> None:
    """While one run holds NAME.gguf.partial (locked), another is refused in one line and leaves it;
    a stale partial (no run holds it) is written over."""
    import fcntl
    import os

    base, adapter, _ = merges["llama"]
    out = tmp_path / "x.gguf"
    partial = tmp_path / "x.gguf.partial"
    partial.write_bytes(b"held")
    fd = os.open(partial, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--dtype", "q8_0", "-q"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another streammerge run is writing this file" in err[0], err
        assert partial.read_bytes() == b"held" and not out.exists()
    finally:
        os.close(fd)
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(out), "--dtype", "q8_0", "-q"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and not partial.exists()
