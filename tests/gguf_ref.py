"""The reference for GGUF outputs: llama.cpp's own converter (``convert_hf_to_gguf.py``, its
conversion package and the gguf-py vendored beside it) from the llama-cpp-python 0.3.36 sdist,
fetched from the package registry (~76 MB, its sha256 checked), and helpers to hold a file of
streammerge's against the converter's of the same merge. The ``converter`` fixture is conftest's."""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SDIST_NAME, SDIST_FILE = "llama-cpp-python", "llama_cpp_python-0.3.36.tar.gz"
DESCRIPTIVE = ("general.name", "general.size_label", "general.tags")
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def fetch_sdist(root: Path) -> Path:
    """The sdist from the package registry's simple index (JSON), its sha256 checked: pip download
    would build its metadata, and with it cmake from source."""
    import hashlib
    import urllib.request

    request = urllib.request.Request(f"https://pypi.org/simple/{SDIST_NAME}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        (entry,) = [f for f in json.load(r)["files"] if f["filename"] == SDIST_FILE]
    target = root / SDIST_FILE
    digest = hashlib.sha256()
    with urllib.request.urlopen(entry["url"], timeout=300) as r, open(target, "wb") as out:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    assert digest.hexdigest() == entry["hashes"]["sha256"], "the sdist does not match the index's sha256"
    return target


def extract_converter(root: Path) -> Path:
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ from the sdist, into ``root / "ref"``."""
    try:
        archive = fetch_sdist(root)
    except OSError as exc:
        pytest.skip(f"the reference converter could not be fetched from the package registry ({exc})")
    prefix = SDIST_FILE.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and
                   (m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "conversion/",
                                                                                    prefix + "gguf-py/")))]
        for m in members:
            m.name = m.name.removeprefix(prefix)
        tar.extractall(root / "ref", members=members, filter="data")
    archive.unlink()
    return root / "ref"


def with_tokenizer(base: Path, root: Path, *, beyond: bool = True) -> Path:
    """A SentencePiece BPE model trained here with identity normalisation and no whitespace
    collapsing (llama.cpp and transformers then tokenize alike), saved into ``base``, with added tokens
    in tokenizer_config.json (special, special-looking, a piece with a space; with ``beyond``, one past
    the vocabulary, which the converters skip, but Phi-3's, which fails on it)."""
    import sentencepiece as spm

    text = "\n".join([f"the quick brown fox jumps over the lazy dog {i}" for i in range(200)] + ["hello merge"] * 50)
    (root / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(base / "tokenizer"), vocab_size=150,
                                   model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    decoder = {i: {"content": text, "special": special, "lstrip": False, "rstrip": False, "normalized": False,
                   "single_word": False} for i, text, special in
               [(0, "<unk>", True), (1, "<s>", True), (2, "</s>", True), (150, "<|end|>", False),
                (151, "\u2581extra", False), (152, "<tool>", True), *([(400, "<beyond>", True)] if beyond else [])]}
    (base / "tokenizer_config.json").write_text(json.dumps({  # (added tokens as transformers saves them)
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "added_tokens_decoder": decoder}))
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # (where transformers 5 saves it)
    return base


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


def with_bpe_tokenizer(base: Path) -> Path:
    """A home-made BPE tokenizer.json (tokenizers' trainer; an added special token and an added
    normal one) saved into ``base``; its pre-tokenizer fingerprint is no model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([f"the quick brown fox jumps over the lazy dog {i}" for i in range(300)],
                            trainers.BpeTrainer(vocab_size=140, special_tokens=["<unk>", "<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>")
    fast.add_tokens(["<extra>"])
    fast.save_pretrained(base)
    return base


WORKER = """
import contextlib, json, runpy, sys, traceback
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/gguf-py")
import conversion.base as base
script, answer, plain = sys.argv[1] + "/convert_hf_to_gguf.py", sys.stdout, base.TextModel.get_vocab_base_pre
for line in sys.stdin:
    job = json.loads(line)
    base.TextModel.get_vocab_base_pre = (lambda self, tokenizer: job["pre"]) if job["pre"] else plain
    sys.argv = ["convert", job["merged"], "--outtype", job["outtype"], "--outfile", job["out"]]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            runpy.run_path(script, run_name="__main__")
        result = {"ok": True}
    except BaseException as exc:  # (SystemExit too: the converter exits on errors)
        result = {"ok": isinstance(exc, SystemExit) and not exc.code, "error": traceback.format_exc()}
    answer.write(json.dumps(result) + "\\n")
    answer.flush()
"""
_workers: dict[Path, subprocess.Popen] = {}


def convert(converter: Path, merged: Path, outtype: str, out: Path, *, pre: str | None = None) -> Path:
    """The reference converter's GGUF of ``merged``; with ``pre``, its fingerprint lookup answers that
    name (it raises on a fingerprint it does not know, as a home-made tokenizer's). Conversions run in
    one long-lived worker per converter, which imports torch and transformers once."""
    worker = _workers.get(converter)
    if worker is None or worker.poll() is not None:
        worker = _workers[converter] = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(converter)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        atexit.register(worker.kill)
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(json.dumps({"merged": str(merged), "outtype": outtype, "out": str(out), "pre": pre}) + "\n")
    worker.stdin.flush()
    result = json.loads(worker.stdout.readline() or '{"ok": false, "error": "the worker died"}')
    assert result["ok"], result.get("error")
    return out


def same_file(ours: Path, ref: Path, converter: Path) -> dict:
    """Assert the two files hold the same tensors (names, types, shapes, bytes) and metadata (but the
    descriptive keys); our metadata returned."""
    (kv_ours, t_ours), (kv_ref, t_ref) = read(ours, converter), read(ref, converter)
    assert t_ours == t_ref
    assert {k: v for k, v in kv_ours.items() if k not in DESCRIPTIVE} == \
        {k: v for k, v in kv_ref.items() if k not in DESCRIPTIVE}
    return kv_ours
