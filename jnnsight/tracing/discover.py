"""Step 3, discover: the sites of a forward pass and the values seen there.

A *site* is one place where a program can read or write: the input or the
output of one call of one module, keyed by ``(module path, call index, kind)``.
One ``jax.eval_shape`` of the forward under a recording interceptor lists every
site in forward order with the abstract value (structure, shapes, dtypes) seen
there. The table is cached by model and input shapes.

Example::

    >>> import jax.numpy as jnp, flax.linen as nn
    >>> from jnnsight.tracing.discover import discover
    >>> mod = nn.Dense(3)
    >>> x = jnp.ones((2, 4))
    >>> table = discover(mod, mod.init(jax.random.key(0), x), (x,), {})
    >>> table.get(((), 0, "output")).leaves
    (ShapeDtypeStruct(shape=(2, 3), dtype=float32),)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import numpy as np
from jax import core

SiteKind = Literal["input", "output"]
SiteKey = tuple[tuple[str, ...], int, SiteKind]


def is_array(leaf: Any) -> bool:
    """Leaves a program can read and write; the rest are static Python values."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def abstract_leaves(value: Any) -> tuple[jax.tree_util.PyTreeDef, tuple[Any, ...]]:
    """A value's structure, with arrays replaced by ``ShapeDtypeStruct``."""
    leaves, treedef = jax.tree_util.tree_flatten(value)
    return treedef, tuple(
        jax.ShapeDtypeStruct(np.shape(x), x.dtype) if is_array(x) else x for x in leaves
    )


@dataclass(frozen=True)
class Site:
    """One readable and writable place of the forward pass.

    Attributes:
      key: ``(module path, call index, "input" | "output")``.
      order: position in the forward; a write at a site may only depend on
        sites of lower order.
      treedef: the value's pytree structure; an input site's value is
        ``(args, kwargs)``.
      leaves: ``ShapeDtypeStruct`` per array leaf, the value itself otherwise.
    """

    key: SiteKey
    order: int
    treedef: jax.tree_util.PyTreeDef
    leaves: tuple[Any, ...]

    @property
    def path(self) -> tuple[str, ...]:
        return self.key[0]

    @cached_property
    def avals(self) -> tuple[core.ShapedArray | None, ...]:
        """The abstract value of each array leaf (None for static leaves)."""
        return tuple(
            core.ShapedArray(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else None
            for x in self.leaves
        )

    def unflatten(self, leaves: list[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


@dataclass(frozen=True)
class ModuleInfo:
    """What discovery saw of one module: its class and how often it ran."""

    type_name: str
    calls: int
    module: nn.Module  # an unbound copy, to apply the module in a block


@dataclass(frozen=True)
class SiteTable:
    """Every site of one forward pass, in forward order."""

    sites: tuple[Site, ...]
    modules: dict[tuple[str, ...], ModuleInfo] = field(repr=False)
    _by_key: dict[SiteKey, Site] = field(repr=False, compare=False)

    def get(self, key: SiteKey) -> Site | None:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self.sites)


def site_interceptor(
    on_input: Callable[[SiteKey, Any, tuple, dict], tuple[tuple, dict]],
    on_output: Callable[[SiteKey, Any, Any], Any],
    call_module: Callable[[SiteKey, Callable[[], Any]], Any] | None = None,
) -> Callable[..., Any]:
    """A flax interceptor that numbers calls and hands each site to a callback.

    ``on_input`` may replace the arguments and ``on_output`` the output;
    ``call_module`` may run the module or not (``envoy.skip``).
    """
    counts: dict[tuple[str, ...], int] = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        path = tuple(module.path)
        call = counts.get(path, 0)
        counts[path] = call + 1
        args, kwargs = on_input((path, call, "input"), module, args, kwargs)
        if call_module is None:
            out = next_fun(*args, **kwargs)
        else:
            out = call_module((path, call, "input"), lambda: next_fun(*args, **kwargs))
        return on_output((path, call, "output"), module, out)

    return interceptor


def _unbound_copy(module: nn.Module) -> nn.Module:
    return module.clone(parent=None, _deep_clone=True, _reset_names=True)


def _record(module: nn.Module, variables: Any, args: tuple, kwargs: dict) -> SiteTable:
    sites: list[Site] = []
    modules: dict[tuple[str, ...], ModuleInfo] = {}

    def add(key: SiteKey, value: Any) -> None:
        treedef, leaves = abstract_leaves(value)
        sites.append(Site(key, len(sites), treedef, leaves))

    def on_input(key, mod, a, k):
        path, call, _ = key
        info = modules.get(path)
        copy = info.module if info is not None else _unbound_copy(mod)
        modules[path] = ModuleInfo(type(mod).__name__, call + 1, copy)
        add(key, (a, k))
        return a, k

    def on_output(key, mod, out):
        add(key, out)
        return out

    def forward(variables, args, kwargs):
        with nn.intercept_methods(site_interceptor(on_input, on_output)):
            return module.apply(variables, *args, **kwargs)

    jax.eval_shape(forward, variables, args, kwargs)
    return SiteTable(tuple(sites), modules, {s.key: s for s in sites})


def shape_key(tree: Any) -> Any:
    """A hashable key of a pytree's structure, shapes, dtypes and static leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), x.dtype) if is_array(x) else x for x in leaves)


def discover(module: nn.Module, variables: Any, args: tuple, kwargs: dict) -> SiteTable:
    """The site table of ``module.apply(variables, *args, **kwargs)``.

    The caller caches it by :func:`shape_key` of the inputs: a forward of the
    same shapes has the same sites.
    """
    return _record(module, variables, args, kwargs)
