"""A checkpoint as a linen module, its variables and its tokenizer.

Example::

    >>> module, variables, tokenizer = load_pretrained("path/to/SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ..modeling import build, tie_embeddings
from ..modeling.common import nest
from .checkpoint import CheckpointNotFoundError, load_checkpoint, resolve
from .tokenizer import load_tokenizer


def load_model(
    name_or_path: str, dtype: Any = jnp.float32, revision: str | None = None
) -> tuple[nn.Module, dict[str, Any], Path]:
    """``(module, {"params": ...}, local path)`` of a hub id, folder or ``.gguf`` file."""
    path = resolve(name_or_path, revision)
    config, tensors = load_checkpoint(path, dtype=dtype)
    module, _ = build(config, dtype)
    tensors = tie_embeddings({k: jnp.asarray(v, dtype=dtype if v.dtype.kind == "f" else None)
                              for k, v in tensors.items()}, config)
    return module, {"params": nest(tensors)}, path


def load_pretrained(
    name_or_path: str, dtype: Any = jnp.float32, revision: str | None = None
) -> tuple[nn.Module, dict[str, Any], Any]:
    """``(module, variables, tokenizer)``; the tokenizer is None (with a warning) where
    the checkpoint has none: such a model takes token ids."""
    module, variables, path = load_model(name_or_path, dtype, revision)
    try:
        tokenizer = load_tokenizer(path, padding_side="left")
    except CheckpointNotFoundError as err:
        warnings.warn(f"{err} The model takes token ids only.", stacklevel=3)
        tokenizer = None
    return module, variables, tokenizer
