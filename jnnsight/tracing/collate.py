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
from jax import core

from ..errors import JnnsightError, UserLine, at_line
from .discover import is_array
from .program import Rows


@dataclass(frozen=True)
class Batch:
    """One forward's inputs, and the rows each invoke owns."""

    args: tuple
    kwargs: dict
    rows: tuple[Rows, ...]
    # leaves of (args, kwargs) with no row per example (a PRNG key, a table), by index
    shared: frozenset[int] = frozenset()


def _same(a: Any, b: Any) -> bool:
    """The same array in two invokes: the same object, or equal concrete values."""
    if a is b:
        return True
    if isinstance(a, core.Tracer) or isinstance(b, core.Tracer):
        return False
    return np.shape(a) == np.shape(b) and a.dtype == b.dtype and bool(jnp.array_equal(a, b))


def _row_counts(columns: list[tuple], alike: list[bool], lines: list[UserLine | None]) -> list[int]:
    """Each invoke's number of rows: axis 0 of its first array argument that is not the
    same in every invoke. A table or key passed to all invokes may come first
    (``tracer.invoke(table, x)``); the rows are ``x``'s. ``columns`` holds each argument
    leaf as the invokes give it; ``alike``, whether they all give the same one."""
    batched = [i for i, column in enumerate(columns) if is_array(column[0]) and np.ndim(column[0]) >= 1]
    if not batched:
        raise JnnsightError(at_line(lines[0],
            "an invoke's input has no array with a batch axis: jnnsight batches "
            "invokes along axis 0 of their arrays. Give inputs of shape (batch, ...)."
        ))
    index = next((i for i in batched if not alike[i]), batched[0])
    sizes = []
    for leaf, line in zip(columns[index], lines):
        rows = np.shape(leaf)[0]
        if jax.export.is_symbolic_dim(rows):
            raise JnnsightError(at_line(line,
                f"the batch size is the symbol {rows} (jax.export with a symbolic shape): "
                "jnnsight splits a batch into invokes' rows, so it needs the number. Export "
                "one program per batch size, or make only other dimensions symbolic."
            ))
        sizes.append(int(rows))
    return sizes


def _argument(path: tuple) -> str:
    """A leaf's path in ``(args, kwargs)`` as the user wrote it: ``kwargs['key']``."""
    return ("args" if path[0].idx == 0 else "kwargs") + jax.tree_util.keystr(path[1:])


def _check_hashable(args: tuple, kwargs: dict, line: UserLine | None) -> None:
    """Arguments that are not arrays key the compiled programs: they must hash."""
    for path, leaf in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]:
        if is_array(leaf):
            continue
        try:
            hash(leaf)
        except TypeError:
            raise JnnsightError(at_line(line,
                f"the argument `{_argument(path)}` ({type(leaf).__name__}) cannot be hashed: "
                "jnnsight compiles one program per value of each argument that is not an "
                "array, and finds it by that value. Pass a hashable value (a tuple, a "
                "frozen dataclass, a string) or an array."
            )) from None


def _check_like(first: Any, other: Any, line: UserLine | None) -> None:
    """``other`` can be concatenated to ``first``: same structure, shapes past axis 0, statics."""
    a_leaves, a_def = jax.tree_util.tree_flatten(first)
    b_leaves, b_def = jax.tree_util.tree_flatten(other)
    if a_def != b_def:
        raise JnnsightError(at_line(line,
            f"this invoke's input has structure {b_def}, and the first invoke's {a_def}: "
            "every invoke of a trace must pass the same arguments."
        ))
    for a, b in zip(a_leaves, b_leaves):
        if is_array(a) != is_array(b):
            raise JnnsightError(at_line(line, f"this invoke passes {b!r} where the first passes {a!r}."))
        if not is_array(a):
            if a != b:
                raise JnnsightError(at_line(line,
                    f"invokes disagree on a non-array argument ({a!r} vs {b!r}): such "
                    "arguments must be equal in every invoke."
                ))
        elif np.shape(a)[1:] != np.shape(b)[1:] or a.dtype != b.dtype:
            fix = ("pad them to one shape" if np.shape(a)[1:] != np.shape(b)[1:] else
                   f"give them one dtype (`x.astype({jnp.dtype(a.dtype).name!r})`)")
            raise JnnsightError(at_line(line,
                f"this invoke's input is {b.dtype}{list(np.shape(b))} and the first "
                f"invoke's {a.dtype}{list(np.shape(a))}: invokes are concatenated "
                f"along axis 0, so every other axis and the dtype must agree: {fix}."
            ))


def _shared(path: tuple, leaves: tuple, alike: bool, sizes: list[int],
            lines: list[UserLine | None]) -> Any:
    """An argument with no row per example (a PRNG key, a table): every invoke's must be
    the same (``alike``), and the forward gets it once."""
    if not alike:
        differs = next(i for i, leaf in enumerate(leaves) if not _same(leaves[0], leaf))
        raise JnnsightError(at_line(lines[differs],
            f"the argument `{_argument(path)}` has no row per example (its shape "
            f"{list(np.shape(leaves[0]))} does not start with the invoke's {sizes[0]} rows), "
            "and this invoke passes another value of it. Invokes are batched along axis "
            "0, so such an argument (a PRNG key, a table) must be the same in every "
            "invoke: pass one value to all, or give it one row per example."
        ))
    return leaves[0]


def collate(
    inputs: list[tuple[tuple, dict] | None], lines: list[UserLine | None] | None = None
) -> Batch:
    """Batch the invokes' ``(args, kwargs)``; ``None`` marks an invoke with no input.

    ``lines`` are the invokes' lines in the user's code, for error messages.
    """
    lines = lines or [None] * len(inputs)
    given = [(x, line) for x, line in zip(inputs, lines) if x is not None]
    if not given:
        raise JnnsightError(at_line(lines[0],
            "the trace has no input: pass one to `model.trace(x)` or to at least one "
            "`tracer.invoke(x)`."
        ))
    for x, line in given:
        _check_hashable(*x, line)
    first = given[0][0]
    for x, line in given[1:]:
        _check_like(first, x, line)
    invoke_lines = [line for _, line in given]
    flat, treedef = jax.tree_util.tree_flatten_with_path(first)
    columns = list(zip(*[jax.tree_util.tree_leaves(x) for x, _ in given]))  # a leaf's values
    alike = [is_array(column[0]) and all(_same(column[0], leaf) for leaf in column[1:])
             for column in columns]
    sizes = _row_counts(columns, alike, invoke_lines)
    if len(given) == 1:
        (args, kwargs), _ = given[0]
        return Batch(args, kwargs, tuple(Rows(0, sizes[0], sizes[0]) for _ in inputs))

    def concat(path: tuple, leaves: tuple, alike: bool) -> Any:
        if not is_array(leaves[0]):
            return leaves[0]
        per_row = [np.ndim(x) >= 1 and np.shape(x)[0] == n for x, n in zip(leaves, sizes)]
        if all(per_row):
            return jnp.concatenate([jnp.asarray(leaf) for leaf in leaves], axis=0)
        if any(per_row) and not alike:  # one row per example in some invokes only
            bad = per_row.index(False)
            raise JnnsightError(at_line(invoke_lines[bad],
                f"the argument `{_argument(path)}` has shape {list(np.shape(leaves[bad]))} in "
                f"this invoke, whose input has {sizes[bad]} rows, and one row per example in "
                "another invoke: give every invoke's arguments the same number of rows."
            ))
        return _shared(path, leaves, alike, sizes, invoke_lines)

    batched = [concat(path, column, same) for (path, _), column, same in zip(flat, columns, alike)]
    args, kwargs = jax.tree_util.tree_unflatten(treedef, batched)
    shared = frozenset(i for i, (column, new) in enumerate(zip(columns, batched))
                       if is_array(column[0]) and new is column[0])
    total = sum(sizes)
    rows, start, sizes_iter = [], 0, iter(sizes)
    for x in inputs:
        if x is None:
            rows.append(Rows(0, total, total))
        else:
            size = next(sizes_iter)
            rows.append(Rows(start, start + size, total))
            start += size
    return Batch(args, kwargs, tuple(rows), shared)
