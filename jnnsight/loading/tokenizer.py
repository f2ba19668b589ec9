"""Tokenizers, through transformers (no torch): from a checkpoint folder or from a GGUF file.

transformers' own GGUF route (``AutoTokenizer.from_pretrained(gguf_file=...)``)
imports torch to read the file's metadata. Here :mod:`.gguf_format` reads it,
and transformers' torch-free converter builds the same tokenizer from it.

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
    tokenizer is rebuilt from the file's metadata: :func:`gguf_tokenizer`), or a folder
    plus ``gguf_file`` (a file name in it). A folder with no tokenizer files and
    exactly one ``.gguf`` file uses that file. A hub id is resolved through
    :func:`jnnsight.loading.resolve` first. ``kwargs`` go to
    the tokenizer (e.g. ``padding_side="left"``).
    """
    from transformers import AutoTokenizer

    from .checkpoint import resolve

    path = resolve(path_or_folder, gguf_file=gguf_file)
    if path.is_file():  # a .gguf file
        return gguf_tokenizer(path, **kwargs)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        ggufs = sorted(Path(path).glob("*.gguf"))
        if len(ggufs) == 1:
            return gguf_tokenizer(ggufs[0], **kwargs)
        raise CheckpointNotFoundError(
            f"No tokenizer files in {path} (looked for {', '.join(_TOKENIZER_FILES)}; "
            f"GGUF files there: {_names(ggufs)}). Pass the folder that `save_pretrained` of the "
            "tokenizer wrote, or a .gguf file (or gguf_file=...)."
        )
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


# transformers' GGUF_TOKENIZER_MAPPING leaves these out: special tokens are ids in the file.
_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                      "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def gguf_tokenizer(path: str | os.PathLike, **kwargs: Any) -> Any:
    """The tokenizer a GGUF file describes, as transformers builds it, without torch.

    :func:`.gguf_format.read_gguf` reads the file's ``tokenizer.*`` metadata; transformers'
    GGUF converter (``transformers.integrations.gguf``, torch-free) turns it into
    a fast tokenizer with the same vocabulary, merges, special tokens, BOS rule
    and chat template as ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``
    (whose class may be a subclass, such as ``Qwen2Tokenizer``, that tokenizes
    alike). Where the installed transformers lacks that converter, its own route
    is used (which needs torch). ``kwargs`` go to the tokenizer
    (``padding_side="left"``) and, unlike in transformers' route, win over the
    file's values (``add_bos_token=True`` adds BOS whatever the file says).

        >>> tok = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf", padding_side="left")
    """
    path = Path(path)
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    except ImportError:
        return _transformers_gguf_tokenizer(path, **kwargs)
    from transformers import PreTrainedTokenizerFast

    from .gguf_file import _reader

    fields = _reader(path).fields
    metadata = {key: value for key, value in fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.model" not in metadata:
        raise CheckpointNotFoundError(
            f"{path.name} holds no tokenizer (no tokenizer.* metadata): pass tokenizer= to "
            "LanguageModel, or give token ids."
        )
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    kind = tokenizer.get("tokenizer_type")
    if kind == "llama":  # llama.cpp's default for sentencepiece files
        config.setdefault("add_bos_token", True)
    elif kind == "gemma4":  # its chat template writes <bos> itself (transformers' rule)
        config["add_bos_token"] = False
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(fields.get("general.architecture"), tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**config, **extra, **kwargs})


def _transformers_gguf_tokenizer(path: Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    except ImportError as err:
        raise ImportError(
            f"This transformers version builds a GGUF file's tokenizer through torch ({err}). "
            "Install torch, or a transformers version with `transformers.integrations.gguf` "
            "(5.x), to load the tokenizer of a .gguf file."
        ) from err
