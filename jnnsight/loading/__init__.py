"""Loading checkpoints without torch: the hub cache, config.json, safetensors, GGUF, tokenizers.

Example::

    >>> from jnnsight.loading import load_checkpoint, load_tokenizer
    >>> config, tensors = load_checkpoint("HuggingFaceTB/SmolLM2-135M")   # hub id, folder or .gguf
    >>> tokenizer = load_tokenizer("HuggingFaceTB/SmolLM2-135M")

Tensors are numpy arrays under Hugging Face PyTorch keys and layouts; nest them
for linen with :func:`jnnsight.modeling.common.nest`.
"""

from __future__ import annotations

from .checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    hub_offline,
    load_checkpoint,
    load_config,
    load_safetensors,
    resolve,
    safetensors_files,
)
from .gguf_file import gguf_config, load_gguf, permute_qk, unpermute_qk
from .tokenizer import load_tokenizer

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "gguf_config",
    "hub_offline",
    "load_checkpoint",
    "load_config",
    "load_gguf",
    "load_safetensors",
    "load_tokenizer",
    "permute_qk",
    "resolve",
    "safetensors_files",
    "unpermute_qk",
]
