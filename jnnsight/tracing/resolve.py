"""Step 7, resolve: saved values become arrays in the caller's variables.

After the forward, every saved tracer found in the block's namespace (also
inside lists, tuples and dicts, which are updated in place) is replaced by its
value: a concrete ``jax.Array``, or the user's own tracer where the block runs
under ``jax.jit``/``jax.grad``/``jax.vmap``. A tracer of the block that was not
saved becomes an :class:`Unsaved` marker whose every use raises a clear error.
The names are then written back into the caller's frame, function frames
included.

Example::

    >>> with model.trace(x):
    ...     h = model.block_1.output.save()     # after the block: a jax.Array
    ...     g = model.block_2.output            # after the block: Unsaved
"""

from __future__ import annotations

import ctypes
import sys
import types
from typing import Any, Callable

import jax

from ..errors import UnsavedValueError, UserLine, at_user_line


class Unsaved:
    """What an unsaved value of a block is after the block: any use is an error."""

    __slots__ = ("_name", "_line")

    def __init__(self, name: str, line: UserLine | None):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_line", line)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        where = f" (block at {self._line})" if self._line else ""
        raise UnsavedValueError(at_user_line(
            f"`{self._name}` is a value of a trace block{where} that was not saved, so it "
            f"does not exist after the block. Save it inside the block: "
            f"`{self._name} = ....save()` or `jnnsight.save({self._name})`."
        ))

    def __repr__(self) -> str:
        return f"<unsaved value of a trace block: {self._name}>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)  # introspection (copy, pickle, hasattr) stays quiet
        return self._fail()

    __setattr__ = _fail
    __getitem__ = _fail
    __setitem__ = _fail
    __iter__ = _fail
    __len__ = _fail
    __bool__ = _fail
    __float__ = _fail
    __int__ = _fail
    __index__ = _fail
    __array__ = _fail
    __jax_array__ = _fail
    __call__ = _fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _fail
    __truediv__ = __rtruediv__ = __matmul__ = __rmatmul__ = __pow__ = __neg__ = _fail
    __lt__ = __le__ = __gt__ = __ge__ = _fail


# JAX flattens the arguments of its functions (``jax.nn.softmax``, ``jnp.sum``, a user's
# ``jax.jit``) as pytrees: flattening an Unsaved value is its clear error. (Abstracting
# an object by its ``__jax_array__`` is an error of JAX's own, naming no variable.)
jax.tree_util.register_pytree_node(Unsaved, lambda unsaved: unsaved._fail(), lambda *_: None)


def replace_values(
    value: Any, name: str, swap: Callable[[Any, str], Any], depth: int = 0
) -> Any:
    """``value`` with ``swap`` applied to every leaf; lists and dicts in place."""
    if depth > 8 or isinstance(value, Unsaved):
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            new = replace_values(item, f"{name}[{i}]", swap, depth + 1)
            if new is not item:
                value[i] = new
        return value
    if isinstance(value, dict):
        for key, item in list(value.items()):
            new = replace_values(item, f"{name}[{key!r}]", swap, depth + 1)
            if new is not item:
                dict.__setitem__(value, key, new)
        return value
    if isinstance(value, tuple):
        items = [replace_values(item, f"{name}[{i}]", swap, depth + 1) for i, item in enumerate(value)]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    leaves, treedef = jax.tree_util.tree_flatten(value)
    if treedef.num_nodes > 1:  # another registered pytree: a model output dataclass, say
        swapped = [swap(leaf, name) for leaf in leaves]
        if any(a is not b for a, b in zip(swapped, leaves)):
            return jax.tree_util.tree_unflatten(treedef, swapped)
        return value
    return swap(value, name)


def code_names(code: types.CodeType) -> frozenset[str]:
    """Every name a block's code (and code nested in it) can bind or load."""
    names = set(code.co_names) | set(code.co_varnames)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= code_names(const)
    return frozenset(names)


_LIBRARIES = {"jnnsight", "jax", "jaxlib", "flax", "numpy", "builtins"}


def _user_attributes(value: Any) -> dict[str, Any] | None:
    """The ``__dict__`` of an instance of a user's class, else None."""
    attrs = getattr(value, "__dict__", None)
    if not isinstance(attrs, dict) or isinstance(value, (type, types.ModuleType, types.FunctionType)):
        return None
    if type(value).__module__.split(".")[0] in _LIBRARIES:
        return None
    return attrs


def resolve_namespace(namespace: dict[str, Any], names: frozenset[str],
                      before: dict[str, Any], swap: Callable[[Any, str], Any]) -> dict[str, Any]:
    """Apply ``swap`` to the values of ``names``; the names whose value changed.

    Attributes of a user's objects are visited where the block names them
    (``self.h = ....save()``).
    """
    changed = {}
    for name in names:
        if name not in namespace:
            continue
        value = namespace[name]
        new = replace_values(value, name, swap)
        if new is not value or before.get(name, _MISSING) is not value:
            namespace[name] = new
            changed[name] = new
        attrs = _user_attributes(new)
        if attrs is not None:
            for attr in names & attrs.keys():
                item = attrs[attr]
                replaced = replace_values(item, f"{name}.{attr}", swap)
                if replaced is not item:
                    setattr(new, attr, replaced)
    return changed


_MISSING = object()


def write_frame(frame: types.FrameType, namespace: dict[str, Any], changed: dict[str, Any]) -> None:
    """Write the block's changed names into the caller's frame."""
    if frame.f_locals is frame.f_globals:
        return  # module level: the block ran in the frame's own globals
    code = frame.f_code
    local_names = set(code.co_varnames) | set(code.co_cellvars) | set(code.co_freevars)
    # A name a function assigns is its local unless declared `global` (in the block too).
    frame.f_globals.update({k: v for k, v in changed.items()
                            if k not in local_names and k in code.co_names})
    updates = {k: v for k, v in changed.items() if k in local_names}
    if not updates:
        return
    if sys.version_info >= (3, 13):
        for name, value in updates.items():
            frame.f_locals[name] = value  # PEP 667: a write-through proxy
        return
    frame.f_locals.update(updates)
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
