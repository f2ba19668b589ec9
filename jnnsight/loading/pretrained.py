"""A checkpoint as a linen module, its variables and its tokenizer.

Example::

    >>> module, variables, tokenizer = load_pretrained("path/to/SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ..modeling import build, tie_embeddings
from ..modeling.common import nest
from .checkpoint import load_checkpoint, resolve
from .tokenizer import load_tokenizer


def load_pretrained(
    name_or_path: str, dtype: Any = jnp.float32, revision: str | None = None
) -> tuple[nn.Module, dict[str, Any], Any]:
    """``(module, {"params": ...}, tokenizer)`` of a hub id, folder or ``.gguf`` file."""
    path = resolve(name_or_path, revision)
    config, tensors = load_checkpoint(path, dtype=dtype)
    module, _ = build(config, dtype)
    tensors = tie_embeddings({k: jnp.asarray(v, dtype=dtype if v.dtype.kind == "f" else None)
                              for k, v in tensors.items()}, config)
    tokenizer = load_tokenizer(path, padding_side="left")
    return module, {"params": nest(tensors)}, tokenizer
