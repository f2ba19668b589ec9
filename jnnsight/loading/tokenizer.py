"""Tokenizers, through transformers (no torch): from a checkpoint folder or from a GGUF file.

Example::

    >>> tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # built from the GGUF metadata
    >>> tok("The Eiffel Tower is in the city of")["input_ids"][:3]
    [504, 414, 46682]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointNotFoundError, _names

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path_or_folder: str | os.PathLike, gguf_file: str | None = None, **kwargs: Any) -> Any:
    """A transformers tokenizer for a checkpoint.

    ``path_or_folder`` is a folder with tokenizer files, a ``.gguf`` file (its
    tokenizer is rebuilt from the file's metadata by transformers), or a folder
    plus ``gguf_file`` (a file name in it). A folder with no tokenizer files and
    exactly one ``.gguf`` file uses that file. A hub id is resolved through
    :func:`jnnsight.loading.resolve` first. ``kwargs`` go to
    ``AutoTokenizer.from_pretrained`` (e.g. ``padding_side="left"``).
    """
    from transformers import AutoTokenizer

    from .checkpoint import resolve

    path = resolve(path_or_folder, gguf_file=gguf_file)
    if path.is_file():  # a .gguf file
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        ggufs = sorted(Path(path).glob("*.gguf"))
        if len(ggufs) == 1:
            return AutoTokenizer.from_pretrained(str(path), gguf_file=ggufs[0].name, **kwargs)
        raise CheckpointNotFoundError(
            f"No tokenizer files in {path} (looked for {', '.join(_TOKENIZER_FILES)}; "
            f"GGUF files there: {_names(ggufs)}). Pass the folder that `save_pretrained` of the "
            "tokenizer wrote, or a .gguf file (or gguf_file=...)."
        )
    return AutoTokenizer.from_pretrained(str(path), **kwargs)
