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
    P('model', None)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: Rules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("length", None),
)
LOGICAL_AXES = frozenset(name for name, _ in DEFAULT_RULES)  # every name the families use


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

    A logical axis maps to its rule's mesh axis (or tuple of mesh axes, split over
    all of them) when the mesh has every one of those axes, no earlier dimension
    took one of them, and the dimension is a multiple of their total size;
    otherwise the dimension is replicated. ``axes`` of another rank than
    ``shape`` replicate the whole array.

    Example::

        >>> spec_for(("vocab", "embed"), (49152, 576), jax.make_mesh((8,), ("model",)))
        P('model', None)
    """
    if len(axes) != len(shape):
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    parts: list[MeshAxes] = []
    for axis, size in zip(axes, shape):
        target = table.get(axis) if axis is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        if len(set(names)) != len(names):
            raise ValueError(f"the rule for {axis!r} names a mesh axis twice: {target}.")
        span = int(np.prod([mesh.shape.get(n, 0) for n in names], dtype=int))
        if not names or any(n in used for n in names) or not span or size % span:
            parts.append(None)
            continue
        used.update(names)
        parts.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*parts)


def param_sharding(param_axes: Callable[[tuple[str, ...]], tuple[str | None, ...]],
                   path: tuple[str, ...], shape: Sequence[int], mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The ``NamedSharding`` of the parameter at ``path`` (``("params", "model", ...)``)."""
    return NamedSharding(mesh, spec_for(param_axes(path), shape, mesh, rules))


def param_shardings(param_axes: Callable[[tuple[str, ...]], tuple[str | None, ...]],
                    shapes: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A ``NamedSharding`` per leaf of the variables ``shapes`` (arrays or abstract values)."""

    def one(keypath: tuple, leaf: Any) -> NamedSharding:
        path = tuple(str(getattr(k, "key", k)) for k in keypath)
        return param_sharding(param_axes, path, np.shape(leaf), mesh, rules)

    return jax.tree_util.tree_map_with_path(one, shapes)


def place(variables: Any, shardings: Any) -> Any:
    """``jax.device_put`` leaf by leaf, where one array at two leaves (tied
    embeddings) with the same sharding stays one array on the devices."""
    placed: dict[tuple[int, Any], jax.Array] = {}

    def one(leaf: Any, sharding: NamedSharding) -> jax.Array:
        key = (id(leaf), sharding)
        if key not in placed:
            placed[key] = jax.device_put(leaf, sharding)
        return placed[key]

    return jax.tree_util.tree_map(one, variables, shardings)


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


__all__ = [
    "DEFAULT_RULES", "LOGICAL_AXES", "Rules", "automatic", "spec_for", "param_sharding", "param_shardings", "place",
    "batch_sharding", "shard_inputs",
]
