"""Envoys: a mirror of the module tree through which a block reads and writes.

``model.block_1`` is the envoy of the submodule named ``block_1``; numbered
children (``h_0``, ``h_1``, ...) are also reachable as a list, ``model.h[-1]``.
Inside a trace block an envoy's ``.output``, ``.input`` and ``.inputs`` are the
values the forward computes there, as JAX tracers of the invoke's rows;
assigning to them replaces the value. Outside a block they do not exist.

Example::

    >>> with model.trace(x):
    ...     h = model.block_1.output.save()
    ...     model.block_2.output = h * 2
    ...     first = model.block_2.dense.input.save()      # first positional argument
    ...     args, kwargs = model.block_2.inputs
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import SiteError, at_user_line, close_names
from .tracing import program as _program
from .tracing.tracer import collecting
from .tracing.discover import NUMBERED, SERVED_PREFIX, attribute_name, call_name, is_int, module_name

if TYPE_CHECKING:
    from .nnsight import NNsight


def _builder(envoy: "Envoy", what: str) -> _program.Builder:
    builder = _program.current()
    tracer = collecting()
    if builder is None and tracer is not None:
        raise SiteError(at_user_line(
            f"{envoy._name}.{what} is read in the body of a `{tracer._spelling}` with no "
            "input of its own: there, reads and edits go inside `with tracer.invoke(x):` "
            "blocks, one per input. Or give the block its input."
        ))
    if builder is None:
        raise SiteError(at_user_line(
            f"{envoy._name}.{what} exists only inside a trace block "
            "(`with model.trace(...):`, or inside `tracer.invoke(...)` when the trace "
            "has several invokes). To use a value after the block, `.save()` it inside."
        ))
    return builder


def _first_argument(envoy: "Envoy") -> Callable[[tuple[tuple, dict]], Any]:
    def first(value: tuple[tuple, dict]) -> Any:
        if not value[0]:
            raise SiteError(at_user_line(
                f"{envoy._name} was called with no positional argument; use `.inputs`, "
                "which gives `(args, kwargs)`."
            ))
        return value[0][0]
    return first


# nnsight API that jnnsight spells another way or does not have, and what to write.
_NNSIGHT_ONLY = {
    "session": "jnnsight has no session: run traces one after another (a saved value is a "
               "jax.Array the next block can use), or batch inputs with `tracer.invoke`.",
    "edit": "jnnsight has no persistent edits: put the edit in a function that opens "
            "`model.trace(...)` and call it, or use `model.intervene(body)`.",
    "source": "jnnsight addresses module inputs and outputs only, not lines of a forward.",
    "all": "in a generate block, `with tracer.all():` addresses every step.",
    "iter": "in a generate block, `for step in tracer.iter[1:4]:` addresses steps.",
}


class Envoy:
    """The stand-in of one module of the model: its sites, children and parameters."""

    def __init__(self, model: "NNsight", path: tuple[str, ...]):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_path", path)

    # the tree ---------------------------------------------------------------------

    @property
    def _name(self) -> str:
        return module_name(self._path, self._model._has_module)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        model = self._model
        children = model._children(self._path)
        at_root = not self._path
        if name.startswith(SERVED_PREFIX) and attribute_name(name[len(SERVED_PREFIX):], at_root) == name:
            name = name[len(SERVED_PREFIX):]  # a child named as an envoy attribute: E_output
        if name in children:
            return model._envoy(self._path + (name,))
        numbered = _numbered_children(children)
        if name in numbered:
            return EnvoyList([model._envoy(self._path + (c,)) for c in numbered[name]],
                             [int(NUMBERED.match(c).group(2)) for c in numbered[name]])
        index = model._param_index(self._path, name)
        if index is not None:
            builder = _program.current()
            if builder is None:
                return model._current_leaves()[index]
            return builder.param(index)
        if name in _NNSIGHT_ONLY:
            raise AttributeError(at_user_line(f"`.{name}` is nnsight's; {_NNSIGHT_ONLY[name]}"))
        names = [attribute_name(n, at_root) for n in sorted(children) + sorted(numbered)] \
            + model._param_names(self._path)
        raise AttributeError(at_user_line(
            f"{self._name} has no submodule or parameter {name!r}. "
            f"{close_names(name, names)} `print(model)` shows the module tree."
        ))

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(at_user_line(
            f"{self._name}.{name} cannot be assigned: only `.output`, `.input` and "
            "`.inputs` of a module can be written, inside a trace block."
        ))

    def __dir__(self) -> list[str]:
        children = self._model._children(self._path)
        names = {attribute_name(n, not self._path) for n in (*children, *_numbered_children(children))}
        return sorted(set(super().__dir__()) | names)

    # sites ----------------------------------------------------------------------------

    def _key(self, builder: _program.Builder, kind: str) -> tuple:
        return (self._path, builder.call_index(self._path), kind)

    def _site(self, kind: str) -> tuple[_program.Builder, _program.Site, Any]:
        builder = _builder(self, kind)
        key = self._key(builder, kind)
        describe = lambda: f"`{call_name(self._name, key[1], kind)}`"  # noqa: E731
        return builder, builder.site(key, describe), describe

    def _read(self, kind: str) -> Any:
        builder, site, _ = self._site(kind)
        return builder.read(site, builder.rows)

    def _write(self, kind: str, value: Any) -> None:
        builder, site, describe = self._site(kind)
        builder.unwatch((site.key, builder.rows), value)
        builder.write(site, builder.rows, value, describe)

    def _writable(self, kind: str, part: Callable[[Any], Any] = lambda value: value,
                  whole: Callable[[Any, Any], Any] | None = None) -> Any:
        """``part`` of the site's value, whose element and field writes write the site.

        The write goes to the call and the invoke's rows the value was read at, even
        after ``.next()`` or in a later invoke; ``whole(value, new)`` is the site's
        value at the write with ``part`` replaced by ``new`` (None: ``part`` is all of it).
        """
        builder, site, describe = self._site(kind)
        rows = builder.rows

        def write(new: Any) -> None:  # into the site's value now (other parts written since)
            value = new if whole is None else whole(builder.value(site, rows), new)
            builder.write(site, rows, value, describe)

        return _program.writable(part(builder.read(site, rows)), write, (site.key, rows))

    @property
    def output(self) -> Any:
        """The module's output at this call; a tuple's elements can be assigned.

        Example::

            >>> with model.trace(x):
            ...     model.layers[0].output[0] = model.layers[0].output[0] * 0
        """
        return self._writable("output")

    @output.setter
    def output(self, value: Any) -> None:
        self._write("output", value)

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """The module's call arguments as ``(args, kwargs)``.

        Example::

            >>> with model.trace(x):
            ...     args, kwargs = model.block_1.inputs
        """
        return self._writable("input")

    @inputs.setter
    def inputs(self, value: tuple[tuple, dict]) -> None:
        self._write("input", value)

    @property
    def input(self) -> Any:
        """The module's first positional argument; a dict's entries can be assigned.

        Example::

            >>> with model.trace(x):
            ...     model.block_2.input = model.block_2.input * 0.5
        """
        return self._writable("input", _first_argument(self),
                              lambda value, new: ((new, *value[0][1:]), value[1]))

    @input.setter
    def input(self, value: Any) -> None:
        args, kwargs = self._read("input")
        self._write("input", ((value, *args[1:]), kwargs))

    def next(self, steps: int = 1) -> "Envoy":
        """Address the module's next call: later accesses see call ``n + steps``.

        As in nnsight, this advances the envoy for the rest of the block.

        Example::

            >>> with model.trace(x):        # a module called twice in the forward
            ...     first = model.shared.output.save()
            ...     second = model.shared.next().output.save()
        """
        builder = _builder(self, "next()")
        if not is_int(steps) or steps < 0:
            raise ValueError(at_user_line(
                f".next(steps) moves forward by a number of calls >= 0, got {steps!r}; an "
                "envoy cannot go back (use another envoy, or read the value earlier)."
            ))
        builder.calls[self._path] = builder.calls.get(self._path, 0) + int(steps)
        return self

    def skip(self, value: Any) -> None:
        """Do not run the module; its output is ``value``.

        Example::

            >>> with model.trace(x):
            ...     model.block_2.skip(model.block_2.input)   # the block becomes identity
        """
        builder = _builder(self, "skip()")
        call = builder.call_index(self._path)
        describe = lambda: f"`{self._name}`"  # noqa: E731
        module_input = builder.site((self._path, call, "input"), describe)
        output = builder.site((self._path, call, "output"), describe)
        builder.skip(module_input, output, builder.rows, value, describe)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Apply this module with the model's parameters, outside the interception.

        Example::

            >>> with model.trace(x):
            ...     logits = model.head(model.block_1.output).save()   # logit lens
        """
        return self._model._apply_submodule(self._path, args, kwargs)

    def __repr__(self) -> str:
        return self._model._tree_repr(self._path)


class EnvoyList:
    """The numbered children of a module (``h_0``, ``h_1``, ...) as a list.

    ``[i]`` is the child numbered ``i``, ``[-1]`` the last; where Flax's numbers
    skip (the functions of an ``nn.Sequential``), a number with no module is an
    error that lists those there are.

    Example::

        >>> model.h[-1], model.h[0:2], len(model.h)
    """

    def __init__(self, envoys: list[Envoy], numbers: list[int] | None = None):
        self._envoys = envoys
        self._numbers = list(range(len(envoys))) if numbers is None else numbers

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return EnvoyList(self._envoys[index])  # a new list: numbered by place, as in nnsight
        given = index
        try:
            index = operator.index(given)  # also numpy and concrete 0-d JAX integers
        except TypeError:
            index = None
        if index is None or isinstance(given, bool):
            raise TypeError(at_user_line(
                f"modules are indexed by a Python int or a slice, got {given!r} "
                f"({type(given).__name__}): `layers[1]`, `layers[-1]`, `layers[2:4]`."))
        if index >= 0 and index in self._numbers:
            return self._envoys[self._numbers.index(index)]
        if -len(self._envoys) <= index < 0:
            return self._envoys[index]
        if self._numbers == list(range(len(self._envoys))):
            why = f"index {index} is out of range: there are {len(self._envoys)} modules here."
        else:
            why = (f"no module here is numbered {index}: they are {self._numbers} (Flax "
                   "numbers the layers of an nn.Sequential by place, and functions such as "
                   "nn.relu have no module).")
        raise IndexError(at_user_line(why))

    def __len__(self) -> int:
        return len(self._envoys)

    def __iter__(self) -> Iterator[Envoy]:
        return iter(self._envoys)

    def __repr__(self) -> str:
        return "\n".join(repr(e) for e in self._envoys)


def _numbered_children(children: list[str]) -> dict[str, list[str]]:
    """Groups ``h_0, h_1, ...`` under ``h`` where ``h`` is not a child itself and
    ``h_0`` exists (GPT-2's ``ln_1`` and ``ln_2`` stay names). Numbers may skip: Flax
    numbers ``nn.Sequential``'s modules by their place among its layers, functions
    included, so ``[Dense, relu, Dense]`` holds ``layers_0`` and ``layers_2``."""
    groups: dict[str, dict[int, str]] = {}
    for child in children:
        match = NUMBERED.match(child)
        if match:
            groups.setdefault(match.group(1), {})[int(match.group(2))] = child
    return {
        base: [numbers[i] for i in sorted(numbers)]
        for base, numbers in groups.items()
        if base not in children and 0 in numbers
    }
