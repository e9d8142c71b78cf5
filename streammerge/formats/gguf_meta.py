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


def read_config(root: Path) -> dict[str, Any]:
    """config.json as the converter reads it: through transformers' AutoConfig (which fills in the
    defaults a short config.json leaves out: max_position_embeddings, head_dim, ...) when it can, else
    the file itself."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(root, trust_remote_code=False).to_dict()
    except Exception:  # (as the converter: no transformers, an unknown model_type, a remote-code config)
        return json.loads((root / "config.json").read_text(encoding="utf-8"))


def write_metadata(writer: Any, config: dict[str, Any], file_type: str, tokenizer_dir: Path, name: str, *,
                   arch: Arch, pre: str | None = None) -> None:
    """Every KV pair but the architecture's name (GGUFWriter's own) into ``writer``, as the converter
    writes them for ``arch``: its base class's set (key / value lengths when the config names head_dim;
    the vocabulary size and rotary dimensions for llama's family; expert counts), Gemma's or Phi-3's."""
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    (_phi3_hparams if arch.hparams == "phi3" else _text_hparams)(writer, config, arch)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, config, tokenizer_dir, pre, arch.vocab)
    if arch.hparams == "gemma":  # (its converter's CodeGemma special tokens, at fixed ids, and no space prefix)
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=False,
                                    special_token_types=["prefix", "suffix", "middle", "fsep", "eot"])
        for kind, token_id in GEMMA_SPECIAL.items():
            special._set_special_token(kind, token_id)
        special.chat_template = None
        special.add_to_gguf(writer)
    if arch.hparams in GEMMAS:
        writer.add_add_space_prefix(False)


def _text_hparams(writer: Any, config: dict[str, Any], arch: Arch) -> None:
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    writer.add_block_count(int(config["num_hidden_layers"]))
    if (ctx := config.get("max_position_embeddings")) is not None:
        writer.add_context_length(int(ctx))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    if arch.hparams not in GEMMAS:
        rope = rope_parameters(config)
        _rope_scaling(writer, rope)
        if rope.get("rope_theta") is not None:
            writer.add_rope_freq_base(float(rope["rope_theta"]))
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
    if config.get("head_dim") is not None or arch.hparams in GEMMAS:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.hparams == "gemma2":
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        writer.add_sliding_window(int(config["sliding_window"]))
    if arch.llama_hparams:
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim)


def _phi3_hparams(writer: Any, config: dict[str, Any], arch: Arch) -> None:
    """Phi-3's own set (rotary dimensions from partial_rotary_factor; sliding_window 0 when none)."""
    rope = rope_parameters(config)
    if rope.get("long_factor"):
        raise UnsupportedError("GGUF: a Phi-3 with long-context rope factors (rope_factors_long / _short tensors) is "
                               "not converted by this version")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config["num_key_value_heads"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(int(float(rope.get("partial_rotary_factor", 1.0)) * hidden) // heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_sliding_window(int(config.get("sliding_window") or 0))


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rotary parameters as the converter gathers them: ``rope_parameters`` (or the older
    ``rope_scaling``), with theta, type, partial factor and original context from the top level."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        raise UnsupportedError("GGUF: per-layer-type rope parameters (full / sliding attention) are not converted by "
                               "this version")
    for key, names in (("rope_theta", ("rope_theta", "rotary_emb_base")), ("rope_type", ("type",)),
                       ("partial_rotary_factor", ("partial_rotary_factor",)),
                       ("original_max_position_embeddings", ("original_max_position_embeddings",))):
        if key not in rope and (value := _first({**config, **rope}, *names)) is not None:
            rope[key] = value
    return rope


def _rope_scaling(writer: Any, rope: dict[str, Any]) -> None:
    """Linear and YaRN scaling as keys; the types llama.cpp takes as extra tensors are refused."""
    import gguf

    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind in (None, "default"):
        return
    if kind not in ("linear", "yarn"):
        raise UnsupportedError(f"GGUF: rope_type {kind!r} (in config.json) is not converted by this version (default, "
                               "linear and yarn are)")
    if factor is None:
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(factor))
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if (value := rope.get(key, rope.get("attn_factor") if key == "attention_factor" else None)) is not None:
                add(float(value))


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


GEMMAS = ("gemma", "gemma2")  # hyperparameter sets without rope keys, with key / value lengths, no space prefix
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
    tokens, scores, types = sentencepiece_vocab(model, int(config["vocab_size"]), where, phi3=vocab == "phi3")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(where, n_vocab=len(tokens)).add_to_gguf(writer)


def sentencepiece_vocab(model: Path, vocab_size: int, where: Path, *,
                        phi3: bool = False) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and llama.cpp token types, padded to ``vocab_size``; then the added tokens of
    added_tokens.json (USER_DEFINED) and tokenizer_config.json's added_tokens_decoder (CONTROL when
    special or special-looking, else USER_DEFINED with the pieces' spaces restored). Phi-3's converter
    also takes tokenizer.json's added tokens, and types by the special flag alone."""
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
    added = where / "added_tokens.json"
    if added.is_file():
        for text, i in json.loads(added.read_text(encoding="utf-8")).items():
            if i < size:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, USER_DEFINED
    for i, text, special in _added_tokens(where, phi3):
        if i >= size:
            continue  # (the converter's "out of range": not in the vocabulary)
        if phi3:
            kind = CONTROL if special else USER_DEFINED
        else:
            kind = CONTROL if special or looks_special(text) else USER_DEFINED
            text = text if kind == CONTROL else text.replace("\u2581", " ")
        tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, kind
    return tokens, scores, types


def _added_tokens(where: Path, phi3: bool) -> list[tuple[int, str, bool]]:
    """(id, content, special) of tokenizer_config.json's added_tokens_decoder (and, for Phi-3, then
    tokenizer.json's added_tokens), in file order."""
    out = []
    config = where / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        out += [(int(i), d["content"], bool(d.get("special"))) for i, d in decoder.items()]
    if phi3 and (where / "tokenizer.json").is_file():
        added = json.loads((where / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
        out += [(int(d["id"]), d["content"], bool(d.get("special"))) for d in added]
    return out


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
