"""``tracer.cache()``: every module call's values after a block, addressed as nnsight does.

A :class:`Cache` maps nnsight's module paths, from the root (``"model.h.0.mlp"``
for the envoy ``model.h[0].mlp``), to one :class:`Entry` per call of the
module: its output after the block's edits and, where asked, its inputs. A key
or an attribute path gives a :class:`CacheView`, whose ``.output``, ``.inputs``
and ``.input`` are the values (a list of them for a module called more than
once, as nnsight gives).

Example::

    >>> with model.trace(x) as tracer:
    ...     cache = tracer.cache(include_inputs=True)
    >>> cache["model.h.0.mlp"].output is cache.model.h[0].mlp.output
    True
    >>> cache[model.h[0].mlp].output.shape, cache.h[0].mlp.input.shape
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

import flax.struct
import jax

from ..errors import SiteError, at_user_line, close_names
from .discover import list_items


def _is_module(node: Any) -> bool:
    """An envoy (one module; it has a path) or an envoy list (numbered modules)."""
    return hasattr(node, "_path") or _is_list(node)


def _is_list(node: Any) -> bool:
    return hasattr(node, "_envoys")


@flax.struct.dataclass
class Entry:
    """One call of a module: its output and, where the cache keeps them, its inputs
    ``(args, kwargs)``. A pytree, so the block's values in it become arrays."""

    output: Any = None
    inputs: Any = None

    @property
    def input(self) -> Any:
        """The first positional argument, else the only keyword argument's value."""
        if self.inputs is None:
            return None
        args, kwargs = self.inputs
        if args or len(kwargs) <= 1:
            return [*args, *kwargs.values()][0] if args or kwargs else None
        raise KeyError(f"this module was called with keyword arguments only "
                       f"({', '.join(kwargs)}), whose order is not kept: read one by name, "
                       "`.inputs[1][name]`.")


def key_of(path: tuple[str, ...], exists: Callable[[tuple[str, ...]], bool] | None = None) -> str:
    """nnsight's cache key of a module path: ``("h_1", "mlp")`` is ``"model.h.1.mlp"``
    (``("h_0", "ln_1")`` is ``"model.h.0.ln_1"`` where no ``ln_0`` exists; see
    :func:`~jnnsight.tracing.discover.list_items`)."""
    return ".".join(["model", *(f"{name}.{index}" if index is not None else name
                                for name, index in list_items(path, exists))])


class Cache(dict):
    """``{nnsight module path: [Entry per call]}``, read through :class:`CacheView`s.

    ``cache[key]`` takes nnsight's key (``"model.h.0.mlp"``), the path without the
    root (``"h.0.mlp"``, ``"h[0].mlp"``), the module tree's (``"h_0.mlp"``) or an
    envoy (``model.h[0].mlp``); ``cache.model.h[0].mlp`` (or ``cache.h[0].mlp``)
    walks the module tree.
    """

    def __init__(self, model: Any):
        super().__init__()
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_filled", False)  # set once the block has ended

    def _check_filled(self) -> None:
        if not self._filled:
            raise SiteError(at_user_line(
                "the cache is filled when the trace block ends: read it after the `with` "
                "block. Inside the block, read the values themselves (`envoy.output`)."
            ))

    def key_of(self, path: tuple[str, ...]) -> str:
        """nnsight's key of the module at ``path`` in this model."""
        return key_of(path, self._model._has_module)

    def key(self, key: Any, known: set[str] | None = None) -> str:
        """The nnsight key a user's key stands for: one of ``known`` (the cache's
        keys) where it names one, with or without the root ``model.``."""
        path = getattr(key, "_path", None)
        if path is not None:
            return self.key_of(path)
        if not isinstance(key, str):
            raise TypeError(f"cache keys are module paths or envoys, not {type(key).__name__}.")
        known = set(dict.keys(self)) if known is None else known
        dotted = re.sub(r"\[(\d+)\]", r".\1", key).strip(".")  # h[0] is h.0
        parts = tuple(dotted.split(".")) if dotted else ()
        rooted = parts[:1] == ("model",)
        candidates = [dotted] if rooted else []  # nnsight's key: "model" is the root
        # the module tree's own paths ("h_0.ln_1"), with or without the root
        candidates += [self.key_of(p) for p in (parts, parts[1:] if rooted else None)
                       if p is not None and self._model._has_module(p)]
        candidates.append(f"model.{dotted}" if dotted else "model")  # without the root
        return next((c for c in candidates if c in known), candidates[-1])

    def __getitem__(self, key: Any) -> "CacheView":
        self._check_filled()
        found = self.key(key)
        if not dict.__contains__(self, found):
            raise KeyError(f"{key!r}: the cache holds no module {found!r}. "
                           + close_names(found, sorted(self)))
        return CacheView(self, found, None)

    def __contains__(self, key: Any) -> bool:
        try:
            return dict.__contains__(self, self.key(key))
        except TypeError:
            return False

    def __getattr__(self, name: str) -> "CacheView":
        if name.startswith("_"):
            raise AttributeError(name)
        model = self._model
        return CacheView(self, None, model if name == "model" else getattr(model, name))

    def entries(self, key: str) -> list[Entry]:
        """The entries of one module, one per call that ran, in call order (a
        generation's steps after it ended early at an end token are left out)."""
        return [entry for entry in dict.__getitem__(self, key) if not any(
            getattr(leaf, "never_ran", False) for leaf in jax.tree_util.tree_leaves(entry))]


class CacheView:
    """One module's cached values (``.output``, ``.inputs``, ``.input``), or a place in
    the module tree to walk on from (``view.mlp``, ``view.h[0]``)."""

    def __init__(self, cache: Cache, key: str | None, node: Any):
        self._cache = cache
        self._node = node
        self._key = key if key is not None else (
            cache.key_of(node._path) if hasattr(node, "_path") else None)

    def _values(self, field: str) -> Any:
        self._cache._check_filled()
        if self._key is None:
            raise TypeError("a list of modules has no values of its own: index it (`cache.h[0]`).")
        if not dict.__contains__(self._cache, self._key):
            raise KeyError(f"the cache holds no module {self._key!r} (it was not in "
                           "`tracer.cache(modules=...)`, or it did not run).")
        values = [getattr(entry, field) for entry in self._cache.entries(self._key)]
        if field == "inputs" and all(v is None for v in values):
            raise KeyError(f"{self._key!r}: the cache kept outputs only; ask "
                           "`tracer.cache(include_inputs=True)` for inputs.")
        return values[0] if len(values) == 1 else values

    @property
    def output(self) -> Any:
        """The module's output after the block's edits (a list: one per call)."""
        return self._values("output")

    @property
    def inputs(self) -> Any:
        """The module's ``(args, kwargs)`` (a list: one per call)."""
        return self._values("inputs")

    @property
    def input(self) -> Any:
        """The module's first argument (a list: one per call)."""
        self._values("inputs")
        return self._values("input")

    def __len__(self) -> int:
        """How many calls of the module the cache holds (of a list: how many modules)."""
        if self._key is None:
            return len(self._node)
        return len(self._cache.entries(self._key)) if dict.__contains__(self._cache, self._key) else 0

    def keys(self) -> list[str]:
        """The cached modules at or below this one."""
        prefix = self._key
        return [k for k in self._cache if prefix is None or k == prefix or k.startswith(prefix + ".")]

    def __getattr__(self, name: str) -> "CacheView":
        if name.startswith("_"):
            raise AttributeError(name)
        child = getattr(self._node, name)
        if not _is_module(child):
            raise AttributeError(f"{name!r} is a parameter of {self._key}, not a module: "
                                 "the cache holds module values.")
        return CacheView(self._cache, None, child)

    def __getitem__(self, index: int | str) -> "CacheView":
        if isinstance(index, str):
            return self._cache[f"{self._key}.{index}"]
        return CacheView(self._cache, None, self._node[index])

    def __iter__(self) -> Iterator["CacheView"]:
        if not _is_list(self._node):
            raise TypeError(f"{self._key} is one module: read `.output`, or iterate a list of modules.")
        return (CacheView(self._cache, None, envoy) for envoy in self._node)

    def __repr__(self) -> str:
        return f"CacheView({self._key!r}, calls={len(self)})" if self._key else "CacheView(list)"
