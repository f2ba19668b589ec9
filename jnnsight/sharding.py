"""Sharding on a device mesh: logical axes of parameters and batches, rules onto mesh axes.

Every model family names the axes of its parameters with logical names
(``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``) in its ``PARAM_AXES``
table, and of its activations (``batch``, ``length``, ``embed``). A rule set maps
logical names onto a mesh's axes; the default puts the batch on ``"data"`` and
the vocabulary, attention heads and MLP on ``"model"`` (Megatron-style tensor
parallelism), where those mesh axes exist and divide the dimension. JAX's SPMD
partitioner does the rest (the mesh's axes are used as ``AxisType.Auto``): jnnsight's engine runs unchanged on sharded arrays,
and saved values keep the sharding the compiled program gives them.

Example::

    >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
    >>> lm = LanguageModel("path/to/model", mesh=mesh)      # parameters sharded as they load
    >>> lm.variables["params"]["lm_head"]["weight"].sharding.spec
    PartitionSpec('model', None)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | None]]

DEFAULT_RULES: Rules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("length", None),
)


def automatic(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis ``AxisType.Auto``: jnnsight lets JAX's SPMD partitioner
    place activations. (``jax.make_mesh`` gives explicit axes in recent JAX, where
    every operation must be told its output sharding.)"""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """The ``PartitionSpec`` of an array with logical ``axes`` on ``mesh``.

    A logical axis maps to its rule's mesh axis when the mesh has that axis, the
    dimension is a multiple of its size, and no earlier dimension took it;
    otherwise the dimension is replicated.

    Example::

        >>> spec_for(("vocab", "embed"), (49152, 576), jax.make_mesh((8,), ("model",)))
        PartitionSpec('model', None)
    """
    table = dict(rules)
    used: set[str] = set()
    parts: list[str | None] = []
    for axis, size in zip(axes, shape):
        target = table.get(axis) if axis is not None else None
        if (target is None or target not in mesh.shape or target in used
                or size % mesh.shape[target]):
            parts.append(None)
            continue
        used.add(target)
        parts.append(target)
    return PartitionSpec(*parts)


def param_shardings(param_axes: Callable[[tuple[str, ...]], tuple[str | None, ...]],
                    shapes: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A ``NamedSharding`` per leaf of the variables ``shapes`` (arrays or abstract values)."""

    def one(keypath: tuple, leaf: Any) -> NamedSharding:
        path = tuple(str(getattr(k, "key", k)) for k in keypath)
        axes = param_axes(path)
        if len(axes) != np.ndim(leaf):
            axes = (None,) * np.ndim(leaf)
        return NamedSharding(mesh, spec_for(axes, np.shape(leaf), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, shapes)


def batch_sharding(mesh: Mesh, rows: int, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Inputs ``[batch, ...]``: rows split over the batch rule's mesh axis where they divide."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (ndim - 1), (rows,) + (1,) * (ndim - 1),
                                        mesh, rules))


def shard_inputs(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Every array leaf of ``tree`` with its axis 0 on the batch axis (replicated where it cannot)."""

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, (jax.Array, np.ndarray)) or isinstance(leaf, jax.core.Tracer):
            return leaf
        if np.ndim(leaf) == 0:
            return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))
        return jax.device_put(leaf, batch_sharding(mesh, np.shape(leaf)[0], np.ndim(leaf), rules))

    return jax.tree_util.tree_map(one, tree)


__all__ = ["DEFAULT_RULES", "Rules", "automatic", "spec_for", "param_shardings", "batch_sharding", "shard_inputs"]
