"""The metadata of a GGUF output, as llama.cpp's converter writes it for the architectures of
``gguf_layout.ARCHS``: ``{arch}.*`` hyperparameters from config.json, the file type, and the
tokenizer. Tokenizers read: SentencePiece (``tokenizer.model``: pieces, scores and types, padded to
the model's vocab_size with ``[PAD{i}]`` unused tokens, ``added_tokens.json`` as user-defined), with
gguf's own ``SpecialVocab`` for the special ids, add_bos / add_eos and the chat template; or BPE
(``tokenizer.json``, read with transformers' AutoTokenizer as the converter reads it: tokens by id,
``[PAD{i}]`` unused up to vocab_size, added tokens CONTROL when special or special-looking, else
USER_DEFINED, the merges by ``SpecialVocab``), named by its pre-tokenizer fingerprint
(``gguf_pre.py``) or by ``--gguf-pre NAME``; an unknown fingerprint without it is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError

if TYPE_CHECKING:
    from .gguf_layout import Arch

# SentencePiece token types as llama.cpp numbers them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def write_metadata(writer: Any, config: dict[str, Any], file_type: str, tokenizer_dir: Path, name: str, *,
                   arch: Arch, pre: str | None = None) -> None:
    """Every KV pair but the architecture's name (GGUFWriter's own) into ``writer``, as the converter
    writes them for ``arch``: its base class's set (key / value lengths when the config names head_dim;
    the vocabulary size and rotary dimensions for llama's family) or Gemma's own."""
    import gguf

    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    if (ctx := config.get("max_position_embeddings")) is not None:
        writer.add_context_length(int(ctx))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    if theta is not None and arch.hparams != "gemma":
        writer.add_rope_freq_base(float(theta))
    if (eps := config.get("rms_norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(float(eps))
    if (experts := _first(config, "num_local_experts", "num_experts", "n_routed_experts")) is not None:
        writer.add_expert_count(int(experts))
    if (used := _first(config, "num_experts_per_tok", "num_experts_per_token", "top_k_experts")) is not None:
        writer.add_expert_used_count(int(used))
    if arch.hparams == "qwen2moe":
        if (ff := config.get("moe_intermediate_size")) is not None:
            writer.add_expert_feed_forward_length(int(ff))
        if (ff := config.get("shared_expert_intermediate_size")) is not None:
            writer.add_expert_shared_feed_forward_length(int(ff))
    if config.get("head_dim") is not None or arch.hparams == "gemma":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    if arch.llama_hparams:
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, config, tokenizer_dir, pre, arch.vocab)
    if arch.hparams == "gemma":  # (its converter's CodeGemma special tokens, at fixed ids, and no space prefix)
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=False,
                                    special_token_types=["prefix", "suffix", "middle", "fsep", "eot"])
        for kind, token_id in GEMMA_SPECIAL.items():
            special._set_special_token(kind, token_id)
        special.chat_template = None
        special.add_to_gguf(writer)
        writer.add_add_space_prefix(False)


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


GEMMA_SPECIAL = {"prefix": 67, "suffix": 69, "middle": 68, "fsep": 70, "eot": 107}  # (the converter's ids)


def _tokenizer(writer: Any, config: dict[str, Any], where: Path, pre: str | None, vocab: str) -> None:
    import gguf

    model = where / "tokenizer.model"
    if vocab == "bpe" or not model.is_file():
        if not (where / "tokenizer.json").is_file():
            wanted = "tokenizer.json, which this architecture's GGUF is made from" if vocab == "bpe" else \
                "neither tokenizer.model nor tokenizer.json"
            raise UnsupportedError(f"GGUF: {where} has {'no ' if vocab == 'bpe' else ''}{wanted}; GGUF needs the "
                                   "tokenizer (--tokenizer DIR)")
        tokens_bpe, types_bpe, name = bpe_vocab(where, int(config["vocab_size"]), pre)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(name)
        writer.add_token_list(tokens_bpe)
        writer.add_token_types(types_bpe)
        gguf.SpecialVocab(where, load_merges=True).add_to_gguf(writer)
        return
    tokens, scores, types = sentencepiece_vocab(model, int(config["vocab_size"]), where / "added_tokens.json")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(where, n_vocab=len(tokens)).add_to_gguf(writer)


def sentencepiece_vocab(model: Path, vocab_size: int, added: Path) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and llama.cpp token types, padded to ``vocab_size``."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model))
    size = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores, types = [-10000.0] * size, [UNUSED] * size
    for i in range(min(size, sp.vocab_size())):
        tokens[i], scores[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    if added.is_file():
        for text, i in json.loads(added.read_text(encoding="utf-8")).items():
            if i < size:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, USER_DEFINED
    return tokens, scores, types


def looks_special(token: str) -> bool:
    """Added tokens the converter types CONTROL though they are not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def bpe_vocab(where: Path, vocab_size: int, pre: str | None) -> tuple[list[str], list[int], str]:
    """Tokens and types of a BPE tokenizer as the converter lists them, and its pre-tokenizer's name."""
    import hashlib

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UnsupportedError("GGUF: a BPE tokenizer (tokenizer.json) is read with transformers: pip install "
                               "transformers") from None
    from .gguf_pre import CHECK_TEXT, PRE_TOKENIZERS

    tokenizer = AutoTokenizer.from_pretrained(where)
    size = vocab_size or len(tokenizer.vocab)
    if pre is None:
        fingerprint = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
        pre = PRE_TOKENIZERS.get(fingerprint)
        if pre is None:
            raise UnsupportedError(f"GGUF: the pre-tokenizer of {where / 'tokenizer.json'} has an unknown fingerprint "
                                   f"({fingerprint[:16]}...); name it with --gguf-pre NAME (e.g. llama-bpe, qwen2, "
                                   "default) as llama.cpp knows it")
    by_id = {i: t for t, i in tokenizer.vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = by_id[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or looks_special(token):
                types.append(CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    return tokens, types, pre
