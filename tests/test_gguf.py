"""GGUF output in the same pass (issue 14, first part): held against llama.cpp's own converter.

The reference is ``convert_hf_to_gguf.py`` with the gguf-py vendored beside it, taken from the
llama-cpp-python sdist (downloaded from PyPI once per session, ~76 MB; the test is skipped, saying
so, when the registry cannot be reached), run on streammerge's safetensors output of the same merge.
Tensor names, types, shapes and bytes must be identical, and every metadata value but the
descriptive general.name / size_label / tags. Bases: tiny Llama (q / k rows permuted by the
converter) and Qwen2 (biases), bf16, with a SentencePiece tokenizer trained here with identity
normalisation; a LoRA adapter made by PEFT with non-zero B.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from oracle import build_adapter, build_base

from streammerge.cli import main

pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
SDIST = "llama-cpp-python==0.3.36"


@pytest.fixture(scope="session")
def converter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, its conversion package and gguf-py, from the sdist."""
    root = tmp_path_factory.mktemp("llama.cpp")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST,
                          "-d", str(root)], capture_output=True, text=True)
    archives = list(root.glob("llama_cpp_python-*.tar.gz"))
    if got.returncode != 0 or not archives:
        pytest.skip(f"the reference converter could not be fetched from PyPI ({got.stderr.strip()[-200:]})")
    prefix = archives[0].name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and
                   (m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "conversion/",
                                                                                    prefix + "gguf-py/")))]
        for m in members:
            m.name = m.name.removeprefix(prefix)
        tar.extractall(root / "ref", members=members, filter="data")
    return root / "ref"


def with_tokenizer(base: Path, root: Path) -> Path:
    text = "\n".join([f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)] + ["hello merge"] * 50)
    (root / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(base / "tokenizer"), vocab_size=150,
                                   model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    (base / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>"}))
    return base


@pytest.fixture(scope="module")
def merges(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    """Per architecture: the base, a LoRA adapter on every linear layer, and their merged safetensors
    (what the reference converter converts)."""
    root = tmp_path_factory.mktemp("gguf")
    made = {}
    for arch in ("llama", "qwen2"):
        base = with_tokenizer(build_base(arch, root / arch, dtype="bf16", sharded=True), root)
        adapter = build_adapter(base, root / f"{arch}-lora", dtype="bf16", r=4, lora_alpha=8).adapter
        merged = root / f"{arch}-merged"
        assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(merged), "-q"]) == 0
        made[arch] = base, adapter, merged
    return made


def read(path: Path, converter: Path) -> tuple[dict, dict]:
    """Metadata values and tensors (type, shape, bytes) with the reference's own gguf-py reader."""
    code = (f"import sys, json, hashlib; sys.path.insert(0, {str(converter / 'gguf-py')!r}); from gguf import GGUFReader\n"
            f"r = GGUFReader({str(path)!r})\n"
            "kv = {k: (f.contents() if not isinstance(f.contents(), bytes) else f.contents().hex()) for k, f in "
            "r.fields.items() if not k.startswith('GGUF.')}\n"
            "ts = {t.name: [t.tensor_type.name, [int(x) for x in t.shape], hashlib.sha256(t.data.tobytes()).hexdigest()] "
            "for t in r.tensors}\n"
            "print(json.dumps([kv, ts], default=str))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout))  # type: ignore[return-value]


DESCRIPTIVE = ("general.name", "general.size_label", "general.tags")


@pytest.mark.parametrize("arch, dtype", [("llama", "f32"), ("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"),
                                         ("qwen2", "q8_0")])
def test_gguf_is_the_reference_converters(tmp_path: Path, merges: dict, converter: Path, arch: str, dtype: str) -> None:
    base, adapter, merged = merges[arch]
    ours = tmp_path / "ours.gguf"
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(ours), "--dtype", dtype, "-q"]) == 0
    assert not ours.with_name("ours.gguf.partial").exists()
    ref = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(merged), "--outtype", dtype,
                    "--outfile", str(ref)], capture_output=True, text=True, check=True)
    (kv_ours, t_ours), (kv_ref, t_ref) = read(ours, converter), read(ref, converter)
    assert t_ours == t_ref  # names, types, shapes, bytes (sha256)
    assert {k: v for k, v in kv_ours.items() if k not in DESCRIPTIVE} == \
        {k: v for k, v in kv_ref.items() if k not in DESCRIPTIVE}
    types = {v[0] for v in t_ours.values()}
    assert types == ({"F32", "Q8_0", "F16"} if dtype == "q8_0" else {"F32", dtype.upper()} if dtype != "f32" else {"F32"})


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
