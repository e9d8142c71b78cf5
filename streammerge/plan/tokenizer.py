"""Where the output's tokenizer files and chat template come from, and why.

1. ``--tokenizer DIR``: from DIR;
2. an adapter that resizes the vocabulary: from its directory (the new tokens are there);
3. an adapter directory that carries tokenizer files or a chat template differing from the
   base's (e.g. a chat template added for fine-tuning): from it;
4. else the base's, copied with the other files.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters.types import LoraAdapter
from ..errors import InputError

# The files a tokenizer and its chat template consist of (``*.tiktoken`` too).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def tokenizer_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_file() and (p.name in TOKENIZER_FILES or p.name.endswith(".tiktoken")))


def _differs(adapter: Path, base: Path) -> list[str]:
    return [p.name for p in tokenizer_files(adapter)
            if not (base / p.name).is_file() or (base / p.name).read_bytes() != p.read_bytes()]


def choose_tokenizer(base: Path, adapters: list[LoraAdapter], *, explicit: Path | None,
                     resized_by: Path | None, vocab_size: int | None) -> tuple[Path | None, str | None]:
    """(directory to take the tokenizer files from, why), or (None, None) for the base's."""
    if explicit is not None:
        if not tokenizer_files(explicit):
            raise InputError(f"--tokenizer {explicit}: no tokenizer files there (expected one of "
                             f"{', '.join(TOKENIZER_FILES[:4])} ...)")
        return explicit, "--tokenizer"
    if resized_by is not None:
        return resized_by, f"vocabulary resized to {vocab_size}"
    for adapter in adapters:
        changed = _differs(adapter.path, base)
        if changed:
            return adapter.path, (f"adapter {adapter.label} carries {', '.join(changed)} differing from the base's "
                                  "(pass --tokenizer DIR to choose another)")
    return None, None
