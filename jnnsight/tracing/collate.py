"""Step 2, collate: the inputs of all invokes become one batch.

Each invoke's positional and keyword arguments are concatenated leaf by leaf
along axis 0; the invoke owns the rows its input filled. An invoke with no
input (``tracer.invoke()``) owns the whole batch. ``LanguageModel`` brings its
own collation (tokenizing, padding); this one is for plain arrays.

Example::

    >>> import jax.numpy as jnp
    >>> batch = collate([((jnp.ones((2, 3)),), {}), ((jnp.zeros((1, 3)),), {})])
    >>> batch.args[0].shape, batch.rows[1]
    ((3, 3), Rows(start=2, stop=3, size=3))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import JnnsightError
from .discover import is_array
from .program import Rows


@dataclass(frozen=True)
class Batch:
    """One forward's inputs, and the rows each invoke owns."""

    args: tuple
    kwargs: dict
    rows: tuple[Rows, ...]


def _rows_of(args: tuple, kwargs: dict) -> int:
    for leaf in jax.tree_util.tree_leaves((args, kwargs)):
        if is_array(leaf) and np.ndim(leaf) >= 1:
            return int(np.shape(leaf)[0])
    raise JnnsightError(
        "an invoke's input has no array with a batch axis: jnnsight batches "
        "invokes along axis 0 of their arrays. Give inputs of shape (batch, ...)."
    )


def collate(inputs: list[tuple[tuple, dict] | None]) -> Batch:
    """Batch the invokes' ``(args, kwargs)``; ``None`` marks an invoke with no input."""
    given = [x for x in inputs if x is not None]
    if not given:
        raise JnnsightError(
            "the trace has no input: pass one to `model.trace(x)` or to at least one "
            "`tracer.invoke(x)`."
        )
    if len(given) == 1:
        args, kwargs = given[0]
        size = _rows_of(args, kwargs)
        return Batch(args, kwargs, tuple(Rows(0, size, size) for _ in inputs))
    treedef = jax.tree_util.tree_structure(given[0])
    sizes = [_rows_of(*x) for x in given]
    for x in given[1:]:
        if jax.tree_util.tree_structure(x) != treedef:
            raise JnnsightError(
                "invokes were given inputs of different structures "
                f"({treedef} and {jax.tree_util.tree_structure(x)}): every invoke of "
                "a trace must pass the same arguments."
            )

    def concat(*leaves: Any) -> Any:
        if not is_array(leaves[0]):
            if any(leaf != leaves[0] for leaf in leaves[1:]):
                raise JnnsightError(
                    f"invokes disagree on a non-array argument ({leaves[0]!r} vs "
                    "another value): such arguments must be equal in every invoke."
                )
            return leaves[0]
        shapes = {tuple(np.shape(leaf)[1:]) for leaf in leaves}
        if len(shapes) > 1:
            raise JnnsightError(
                f"invokes' inputs differ in shape beyond the batch axis ({sorted(shapes)}): "
                "they are concatenated along axis 0, so pad them to one shape first."
            )
        return jnp.concatenate([jnp.asarray(leaf) for leaf in leaves], axis=0)

    args, kwargs = jax.tree_util.tree_map(concat, *given)
    total = sum(sizes)
    rows, start, sizes_iter = [], 0, iter(sizes)
    for x in inputs:
        if x is None:
            rows.append(Rows(0, total, total))
        else:
            size = next(sizes_iter)
            rows.append(Rows(start, start + size, total))
            start += size
    return Batch(args, kwargs, tuple(rows))
