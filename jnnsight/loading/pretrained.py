"""A checkpoint as a linen module, its variables, its tokenizer and its generation defaults.

Example::

    >>> module, variables, tokenizer, generation = load_pretrained("path/to/SmolLM2.Q4_1.gguf")
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np
from jax.sharding import Mesh, NamedSharding

from ..modeling import build, param_axes_of, tie_embeddings
from ..modeling.common import nest, path_of
from ..sharding import DEFAULT_RULES, Rules, param_sharding, param_shardings, place
from .checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    LazyTensor,
    _cast,
    _float_dtype,
    _is_float,
    _progress_bar,
    json_object,
    lazy_safetensors,
    load_checkpoint,
    load_config,
    resolve,
)
from .tokenizer import load_tokenizer


def load_model(
    name_or_path: str, dtype: Any = jnp.float32, revision: str | None = None,
    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, gguf_file: str | None = None,
) -> tuple[nn.Module, dict[str, Any], Path]:
    """``(module, {"params": ...}, local path)`` of a hub id, folder or ``.gguf`` file.

    With a ``mesh``, each parameter is placed as the family's logical axes and
    ``rules`` say; safetensors checkpoints are then read one tensor at a time,
    and each device copies its slice of it: the host holds one tensor, never the
    whole model. Each process reads only the rows and columns its own devices hold.
    """
    dtype = _float_dtype(dtype)
    path = resolve(name_or_path, revision, gguf_file=gguf_file)
    if mesh is not None and not (path.is_file() and path.suffix.lower() == ".gguf"):
        return (*_load_sharded(path, dtype, mesh, rules), path)
    config, tensors = load_checkpoint(path, dtype=dtype)
    module, _ = build(config, dtype)
    expected = _expected_shapes(module)
    tensors = _hub_layout(tensors, expected)
    tensors = tie_embeddings({k: jnp.asarray(v) for k, v in tensors.items()}, config)
    _check_keys(tensors, expected, path)
    variables = {"params": nest(tensors)}
    if mesh is not None:
        variables = place(variables, param_shardings(param_axes_of(module), variables, mesh, rules))
    return module, variables, path


def _load_sharded(path: Path, dtype: Any, mesh: Mesh, rules: Rules) -> tuple[nn.Module, dict[str, Any]]:
    """Module and variables, every tensor read straight into its shards.

    The process holds one tensor at a time, and of it only the rows and columns its
    devices hold (read from the file without a memory map, whose pages would count
    as this process's memory), never the whole model.
    """
    config = load_config(path)
    module, _ = build(config, dtype)
    expected = _expected_shapes(module)
    tensors = tie_embeddings(_hub_layout(lazy_safetensors(path), expected), config)
    _check_keys(tensors, expected, path)
    axes = param_axes_of(module)
    target = None if dtype is None else np.dtype(dtype)  # None: as stored

    def nbytes(tensor: LazyTensor) -> int:
        dtype = next((d for d in (target, tensor.dtype) if d is not None), np.dtype(np.float32))
        return int(np.prod(tensor.shape)) * dtype.itemsize

    arrays: dict[str, jax.Array] = {}
    made: dict[tuple[int, NamedSharding], jax.Array] = {}  # a tied tensor: one array per sharding
    counted: set[int] = set()  # tensors the progress bar has counted
    unique = {id(t): t for t in tensors.values()}.values()
    total = sum(nbytes(t) for t in unique)
    with _progress_bar(total, "Loading into shards", None) as bar:
        for key, tensor in tensors.items():
            sharding = param_sharding(axes, ("params", *path_of(key)), tensor.shape, mesh, rules)
            if (id(tensor), sharding) not in made:
                block = _local_block(sharding, tensor.shape)
                read: dict[str, np.ndarray] = {}  # this host's block, read once for its shards

                def shard(index: tuple, tensor=tensor, read=read, block=block) -> np.ndarray:
                    if "block" not in read:
                        read["block"] = _cast(tensor.read(*block), target)
                    return read["block"][_within(index, block, tensor.shape)]

                made[(id(tensor), sharding)] = jax.make_array_from_callback(tensor.shape, sharding, shard)
                read.clear()
                if id(tensor) not in counted:
                    counted.add(id(tensor))
                    bar.update(nbytes(tensor))
            arrays[key] = made[(id(tensor), sharding)]
    return module, {"params": nest(arrays)}


def _local_block(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The rows and columns (axes 0 and 1) of a tensor that this process's devices
    hold: in a multi-host run with a mesh axis across hosts, each host reads only its
    part of the file."""
    indices = list(sharding.addressable_devices_indices_map(shape).values())
    block = []
    for axis, n in enumerate(shape[:2]):
        spans = [index[axis].indices(n)[:2] for index in indices]
        block.append(slice(min(a for a, _ in spans), max(b for _, b in spans)) if spans
                     else slice(0, 0))  # a mesh without this process's devices
    return tuple(block)


def _within(index: tuple, block: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
    """A shard's ``index`` into the whole tensor, as an index into the ``block`` read."""
    moved = []
    for part, outer, n in zip(index, block, shape):
        start, stop, _ = part.indices(n)
        moved.append(slice(start - outer.start, stop - outer.start))
    return tuple(moved) + tuple(index[len(block):])


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
    # an int8 weight (a quantized checkpoint) would be multiplied as integers
    types = sorted(f"{k} {v.dtype}" for k, v in tensors.items()
                   if getattr(v, "dtype", None) is not None and not _is_float(v.dtype))
    if missing or unexpected or shapes or types:
        def show(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
        raise CheckpointError(
            f"the checkpoint at {path} does not fit the model its config describes: "
            + "; ".join(part for part in (
                f"missing {show(missing)}" if missing else "",
                f"unexpected {show(unexpected)}" if unexpected else "",
                f"wrong shapes {show(shapes)}" if shapes else "",
                f"integer weights {show(types)}" if types else "",
            ) if part)
            + ". Check that config.json belongs to these weights (quantized or adapter "
            "checkpoints are not supported)."
        )


def load_generation_config(path: Path) -> dict[str, Any]:
    """What transformers' ``generate`` takes its default end and pad tokens from.

    A checkpoint folder's ``generation_config.json``; where the folder has none,
    the ``eos_token_id`` and ``pad_token_id`` of its ``config.json``. Either way
    both keys are present (None where the source lacks them: no end token, as in
    transformers). ``{}`` for a GGUF file, whose tokenizer carries both.
    """
    if not path.is_dir():
        return {}
    file = path / "generation_config.json"
    if not file.is_file():
        config = load_config(path)
        return {key: config.get(key) for key in ("eos_token_id", "pad_token_id")}
    return {"eos_token_id": None, "pad_token_id": None, **json_object(file)}


def load_pretrained(
    name_or_path: str, dtype: Any = jnp.float32, revision: str | None = None,
    mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, with_tokenizer: bool = True,
    gguf_file: str | None = None,
) -> tuple[nn.Module, dict[str, Any], Any, dict[str, Any]]:
    """``(module, variables, tokenizer, generation config)``; the tokenizer is None (with
    a warning) where the checkpoint has none: such a model takes token ids. None, quietly,
    without ``with_tokenizer`` (the caller has its own)."""
    module, variables, path = load_model(name_or_path, dtype, revision, mesh, rules, gguf_file)
    tokenizer = None
    try:
        if with_tokenizer:
            tokenizer = load_tokenizer(path, padding_side="left")
    except CheckpointNotFoundError as err:
        warnings.warn(f"{err} The model takes token ids only (or pass tokenizer=).", stacklevel=3)
    return module, variables, tokenizer, load_generation_config(path)
