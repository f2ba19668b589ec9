"""A checkpoint as a linen module, its variables and its tokenizer.

Example::

    >>> module, variables, tokenizer = load_pretrained("path/to/SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..modeling import build, tie_embeddings
from ..modeling.common import nest, path_of
from .checkpoint import CheckpointError, CheckpointNotFoundError, load_checkpoint, resolve
from .tokenizer import load_tokenizer


def load_model(
    name_or_path: str, dtype: Any = jnp.float32, revision: str | None = None
) -> tuple[nn.Module, dict[str, Any], Path]:
    """``(module, {"params": ...}, local path)`` of a hub id, folder or ``.gguf`` file."""
    path = resolve(name_or_path, revision)
    config, tensors = load_checkpoint(path, dtype=dtype)
    module, _ = build(config, dtype)
    expected = _expected_shapes(module)
    tensors = _hub_layout(tensors, expected)
    tensors = tie_embeddings({k: jnp.asarray(v) for k, v in tensors.items()}, config)
    _check_keys(tensors, expected, path)
    return module, {"params": nest(tensors)}, path


# Buffers some checkpoints carry that are not parameters (GPT-2's causal masks, RoPE tables).
_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _expected_shapes(module: nn.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes["params"])
    return {tuple(k.key for k in keypath): tuple(leaf.shape) for keypath, leaf in flat}


def _hub_layout(tensors: dict[str, Any], expected: dict) -> dict[str, Any]:
    """Drop buffers; add the base-model prefix where a checkpoint leaves it out
    (GPT-2 on the hub stores ``h.0.attn.c_attn.weight`` for ``transformer.h.0...``)."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_BUFFERS)}
    roots = {path[0] for path in expected}
    prefix = next((r for r in roots if r != "lm_head"), None)
    if prefix and all(path_of(k)[0] not in roots for k in tensors if not k.startswith("lm_head.")):
        tensors = {k if k.startswith("lm_head.") else f"{prefix}.{k}": v for k, v in tensors.items()}
    return tensors


def _check_keys(tensors: dict[str, Any], expected: dict, path: Path) -> None:
    """Every parameter present with its shape, nothing unknown: else a clear error."""
    given = {path_of(k): tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(".".join(p) for p in expected.keys() - given.keys())
    unexpected = sorted(".".join(p) for p in given.keys() - expected.keys())
    shapes = sorted(f"{'.'.join(p)} {given[p]} (expected {expected[p]})"
                    for p in expected.keys() & given.keys() if given[p] != expected[p])
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        raise CheckpointError(
            f"the checkpoint at {path} does not fit the model its config describes: "
            + "; ".join(part for part in (
                f"missing {show(missing)}" if missing else "",
                f"unexpected {show(unexpected)}" if unexpected else "",
                f"wrong shapes {show(shapes)}" if shapes else "",
            ) if part)
            + ". Check that config.json belongs to these weights (quantized or adapter "
            "checkpoints are not supported)."
        )


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
