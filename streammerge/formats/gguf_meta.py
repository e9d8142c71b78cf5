"""The metadata of a GGUF output, as llama.cpp's converter writes it for the architectures of
``gguf_layout.ARCHS``: ``{arch}.*`` hyperparameters from config.json, the file type, and the
tokenizer. Tokenizers read: SentencePiece (``tokenizer.model``: pieces, scores and types, padded to
the model's vocab_size with ``[PAD{i}]`` unused tokens, ``added_tokens.json`` as user-defined), with
gguf's own ``SpecialVocab`` for the special ids, add_bos / add_eos and the chat template. A BPE
``tokenizer.json`` is refused by name in this version (its pre-tokenizer fingerprint table is not
carried yet)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UnsupportedError

# SentencePiece token types as llama.cpp numbers them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def write_metadata(writer: Any, config: dict[str, Any], file_type: str, tokenizer_dir: Path, name: str, *,
                   llama_extras: bool) -> None:
    """Every KV pair but the architecture's name (GGUFWriter's own) into ``writer``: key / value lengths
    when the config names head_dim; the vocabulary size and rotary dimensions for llama's family."""
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
    if (theta := config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))) is not None:
        writer.add_rope_freq_base(float(theta))
    if (eps := config.get("rms_norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(float(eps))
    if config.get("head_dim") is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    if llama_extras:
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, config, tokenizer_dir)


def _tokenizer(writer: Any, config: dict[str, Any], where: Path) -> None:
    import gguf

    model = where / "tokenizer.model"
    if not model.is_file():
        raise UnsupportedError(f"GGUF: {where} has no tokenizer.model; this version writes SentencePiece tokenizers "
                               "only (a BPE tokenizer.json is not read yet)")
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
