"""Shared fixtures: one small toy transformer, and a hand-written reference.

The reference runs the same flax module under a plain ``nn.intercept_methods``
interceptor that applies edits written by hand, so every jnnsight result is
checked against a forward computed another way.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jnnsight.toy import toy_model

Edit = Callable[[tuple[str, ...], int, Any], Any]


def reference(
    model, *args: Any, edit: Edit | None = None, variables: Any = None, **kwargs: Any
) -> tuple[Any, dict]:
    """Run ``model.module`` with a hand-written interceptor.

    ``edit(path, call, output)`` returns the output to use instead (or the same).
    Returns the model output and every module's output by ``(path, call)``,
    recorded after the edit.
    """
    seen: dict[tuple[tuple[str, ...], int], Any] = {}
    counts: dict[tuple[str, ...], int] = {}

    def interceptor(next_fun, a, k, context):
        if context.method_name != "__call__":
            return next_fun(*a, **k)
        path = tuple(context.module.path)
        call = counts.get(path, 0)
        counts[path] = call + 1
        out = next_fun(*a, **k)
        if edit is not None:
            out = edit(path, call, out)
        seen[(path, call)] = out
        return out

    with nn.intercept_methods(interceptor):
        out = model.module.apply(variables or model.variables, *args, **kwargs)
    return out, seen


@pytest.fixture(scope="session")
def toy():
    """A 3-block toy transformer (width 16, vocab 32) and a batch of 2 x 6 tokens."""
    model, tokens = toy_model(layers=3, width=16, heads=2, vocab=32, length=6, batch=2, seed=1)
    return model, tokens


def assert_close(a: Any, b: Any, tol: float = 1e-5) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert jnp.shape(x) == jnp.shape(y)
        assert float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)), initial=0.0)) <= tol
