"""Step 4, the abstract pass: a block's bodies become one intervention program.

Every body runs once under ``jax.make_jaxpr``. Reading ``module.output`` binds
``site_read``, a primitive with no operands whose abstract value is the site's,
so the body gets a real JAX tracer and any ``jax.numpy`` code works on it.
Writes are recorded per site and emitted once as ``site_write`` when the bodies
are done; ``envoy.skip`` emits ``site_skip``; parameters read in a block bind
``param_read``. The saves are the jaxpr's outputs and arrays from outside the
block are its constants, so they become arguments of the compiled program,
never baked-in values.

The result, :class:`InterventionProgram`, is a pure function of (site values,
parameters, outside arrays) to (site writes, saves).

Example::

    >>> # inside a block, what the user writes ...
    >>> #     model.block_2.output = model.block_1.output * 2
    >>> # ... is recorded as
    >>> #     a = site_read[site=5 leaf=0]
    >>> #     b = mul a 2.0
    >>> #     site_write[site=9] b
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import core
from jax.extend.core import (
    ClosedJaxpr,
    Jaxpr,
    Literal,
    Primitive,
    set_current_trace,
    take_current_trace,
)

from ..errors import (
    JnnsightError,
    SiteError,
    UserLine,
    WriteError,
    at_line,
    at_user_line,
    user_line,
    warn_at_user_line,
)
from .discover import Site, SiteKey, SiteTable, is_array

# -- the primitives of a program ------------------------------------------------

site_read_p = Primitive("site_read")
site_read_p.def_abstract_eval(lambda *, site, leaf, aval: aval)

param_read_p = Primitive("param_read")
param_read_p.def_abstract_eval(lambda *, leaf, aval: aval)

site_write_p = Primitive("site_write")
site_write_p.multiple_results = True
site_write_p.def_abstract_eval(lambda *leaves, site: [])

site_skip_p = Primitive("site_skip")
site_skip_p.multiple_results = True
site_skip_p.def_abstract_eval(lambda *leaves, site: [])

# Gradients (tracing/gradients.py): the cotangent of one site leaf in the backward pass
# of one target, its replacement, and the scalar each `loss.backward()` differentiates.
grad_read_p = Primitive("grad_read")
grad_read_p.def_abstract_eval(lambda *, site, leaf, target, aval: aval)

grad_write_p = Primitive("grad_write")
grad_write_p.multiple_results = True
grad_write_p.def_abstract_eval(lambda value, *, site, leaf, target: [])

backward_target_p = Primitive("backward_target")
backward_target_p.multiple_results = True
backward_target_p.def_abstract_eval(lambda loss, *, target: [])


# -- rows of an invoke --------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """The rows ``[start, stop)`` of a batch of ``size`` rows that an invoke owns."""

    start: int
    stop: int
    size: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.size

    def view(self, leaf: Any, batched: bool) -> Any:
        """What the invoke sees of a leaf: its rows of a batched leaf, else all of it."""
        if self.whole or not batched:
            return leaf
        return jax.lax.slice_in_dim(leaf, self.start, self.stop, axis=0)

    def view_shape(self, leaf: jax.ShapeDtypeStruct, batched: bool) -> tuple[int, ...]:
        if self.whole or not batched:
            return tuple(leaf.shape)
        return (self.stop - self.start, *leaf.shape[1:])

    def update(self, full: Any, part: Any, batched: bool) -> Any:
        if self.whole or not batched:
            return part
        return jax.lax.dynamic_update_slice_in_dim(full, part, self.start, axis=0)


# -- the program ------------------------------------------------------------------


@dataclass(frozen=True)
class InterventionProgram:
    """What a block reads, writes and saves: one jaxpr over site values.

    Contract: ``jaxpr`` has no inputs; its constants are the arrays the block
    closed over (passed to the compiled program as arguments); its equations
    read sites (``site_read``), parameters (``param_read``), and end in at most
    one ``site_write`` or ``site_skip`` per site; its outputs are the saved
    leaves, in the order they were saved. Nothing in it depends on the values of
    the inputs, only on their shapes, so one program serves every call of the
    same block on inputs of the same shapes.

    Attributes:
      jaxpr: the closed jaxpr.
      table: the site table it was traced against.
      read_lines / write_lines: the user's line of the first read and of the
        last write per site order, for error messages.
      stop: whether the body called ``tracer.stop()``.
      grad_write_lines: the line of the first gradient edit per ``(site order,
        leaf, backward target)``; target_lines: the line of each ``backward()``.
    """

    jaxpr: ClosedJaxpr
    table: SiteTable
    read_lines: Mapping[int, UserLine | None]
    write_lines: Mapping[int, UserLine | None]
    stop: bool
    grad_write_lines: Mapping[tuple[int, int, int], UserLine | None] = field(default_factory=dict)
    target_lines: Mapping[int, UserLine | None] = field(default_factory=dict)
    fingerprint: Hashable = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", (self.stop, jaxpr_key(self.jaxpr.jaxpr)))

    def __str__(self) -> str:
        return str(self.jaxpr)


def jaxpr_key(jaxpr: Jaxpr) -> tuple:
    """A hashable key of a jaxpr's computation: equal keys, same computation.

    Variables become their index, literals their value and type; primitives,
    parameters and abstract values are compared as JAX compares them (by
    value), sub-jaxprs recursively; unhashable parameters and large arrays in
    parameters by identity, which may miss a cache hit but never gives a false
    one. Site numbers are only meaningful with the site table: callers key
    caches by (site table, this key). Faster than printing the jaxpr.
    """
    ids: dict[Any, int] = {}

    def atom(a: Any) -> Any:
        if isinstance(a, Literal):
            return ("literal", _value_key(a.val), a.aval)
        return ids[a]

    def bind(variables: Any) -> tuple:
        for v in variables:
            ids[v] = len(ids)
        return tuple(v.aval for v in variables)

    parts: list[Any] = [bind(jaxpr.constvars), bind(jaxpr.invars)]
    for eqn in jaxpr.eqns:
        inputs = tuple(atom(a) for a in eqn.invars)
        params = tuple((k, _param_key(v)) for k, v in sorted(eqn.params.items()))
        parts.append((eqn.primitive, params, inputs, bind(eqn.outvars)))
    parts.append(tuple(atom(a) for a in jaxpr.outvars))
    return tuple(parts)


def _param_key(value: Any) -> Hashable:
    if isinstance(value, ClosedJaxpr):
        return ("closed", jaxpr_key(value.jaxpr), tuple(_value_key(c) for c in value.consts))
    if isinstance(value, Jaxpr):
        return ("jaxpr", jaxpr_key(value))
    if isinstance(value, (tuple, list)):
        return tuple(_param_key(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return _Same(value) if callable(value) else ("repr", type(value).__name__, repr(value))
    return value


def _value_key(value: Any) -> Hashable:
    """Small arrays and scalars by value; larger arrays by identity (no copy, no hashing)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        if isinstance(value, core.Tracer) or np.size(value) > 64:
            return _Same(value)
        array = np.asarray(value)
        return (array.shape, array.dtype.str, array.tobytes())
    try:
        hash(value)
    except TypeError:
        return _Same(value)
    # repr too: 0.0 == -0.0 in Python, and they make different programs
    return (type(value).__name__, value, repr(value))


class _Same:
    """A key part equal only to the very same object, which it keeps alive."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Same) and other.value is self.value


class Builder:
    """The mutable state of one abstract pass: current site values, saves, writes.

    Envoys talk to the active builder (one per thread) while the bodies run.
    """

    def __init__(self, table: SiteTable, param_avals: list[core.ShapedArray]):
        self.table = table
        self.param_avals = param_avals
        self.trace: Any = None
        self.current: dict[SiteKey, list[Any]] = {}
        self.written: dict[SiteKey, UserLine | None] = {}
        self.skipped: dict[SiteKey, list[Any]] = {}
        self.read_lines: dict[int, UserLine | None] = {}
        self.write_lines: dict[int, UserLine | None] = {}
        self.saved: dict[int, Any] = {}  # id -> tracer, kept alive so ids stay unique
        self.save_lines: dict[int, UserLine | None] = {}
        self.internal: set[int] = set()  # saves the library makes (tracer.cache())
        self.gathered: set[int] = set()  # saves to bring to the host after the block
        self.params: dict[int, Any] = {}
        self.calls: dict[tuple[str, ...], int] = {}  # envoy path -> .next() count
        self.step = 0  # the generation step the body addresses (tracer.iter, tracer.all)
        # the names each tracer.iter / tracer.all iteration bound to values holding saves:
        # (generation step, {name: value}), in order
        self.loop_bindings: list[tuple[int, dict[str, Any]]] = []
        self.rows = Rows(0, 0, 0)  # the rows of the invoke whose body is running
        self.stopped = False
        self.finalizers: list[Callable[[], None]] = []
        # gradients: where each read value came from, the backward targets, cotangents
        self.replaced: set[SiteKey] = set()  # sites the block wrote or skipped so far
        # (value, site, leaf, rows, whether the block had replaced the site before the read)
        self.origins: dict[int, tuple[Any, Site, int, Rows, bool]] = {}
        self.targets: list[Any] = []
        self.backward: int | None = None  # the target whose `backward()` block runs
        self.grads: dict[tuple[int, int, int], Any] = {}  # (site, leaf, target) -> cotangent
        self.grad_written: dict[tuple[int, int, int], UserLine | None] = {}
        self.target_lines: dict[int, UserLine | None] = {}
        # `loss.backward()` calls not (yet) entered as `with` blocks, and their lines
        self.unentered_backwards: dict[int, tuple[Any, UserLine | None]] = {}
        # dataclass site values handed out: (value, its fields as handed out, writer, the
        # site and rows it was read at)
        self.watched: list[tuple[Any, dict[str, Any], Callable[[Any], None], Hashable]] = []

    # reading and writing sites --------------------------------------------------

    def site(self, key: SiteKey, describe: Callable[[], str]) -> Site:
        self.write_fields()
        site = self.table.get(key)
        if site is None:
            raise SiteError(at_user_line(self.table.missing(key, describe())))
        if site.lifted:
            raise SiteError(at_user_line(self.table.lifted(site, describe())))
        return site

    def call_index(self, path: tuple[str, ...]) -> int:
        """The call of ``path`` an envoy addresses now: the step's first, plus ``.next()``s."""
        return self.table.call_offset(path, self.step) + self.calls.get(path, 0)

    def _leaves(self, site: Site) -> list[Any]:
        leaves = self.current.get(site.key)
        if leaves is None:
            # Bound at the top level of the program even when the body reads the
            # site inside its own jax.jit, lax.scan or jax.checkpoint.
            with set_current_trace(self.trace):
                leaves = [
                    leaf if aval is None else site_read_p.bind(site=site.order, leaf=j, aval=aval)
                    for j, (leaf, aval) in enumerate(zip(site.leaves, site.avals))
                ]
            self.current[site.key] = leaves
        return leaves

    @staticmethod
    def _batched(site: Site) -> tuple[bool, ...]:
        return site.batched if site.batched is not None else (False,) * len(site.leaves)

    def read(self, site: Site, rows: Rows) -> Any:
        """The site's value as an invoke sees it: its rows, after earlier writes."""
        if site.order not in self.read_lines:
            self.read_lines[site.order] = user_line(2)
        views = self._views(site, rows)
        for j, view in enumerate(views):
            if isinstance(view, core.Tracer):  # a value written here keeps its first site
                self.origins.setdefault(id(view), (view, site, j, rows, site.key in self.replaced))
        return site.unflatten(views)

    def value(self, site: Site, rows: Rows) -> Any:
        """The site's value in ``rows`` now, to build a write from (not a read)."""
        return site.unflatten(self._views(site, rows))

    def _views(self, site: Site, rows: Rows) -> list[Any]:
        return [rows.view(x, b) for x, b in zip(self._leaves(site), self._batched(site))]

    def write(self, site: Site, rows: Rows, value: Any, describe: Callable[[], str]) -> None:
        """Replace the site's value in the invoke's rows; checked against the site."""
        line = user_line(2)
        new = self._checked(site, rows, value, describe)
        full = self._leaves(site)
        batched = self._batched(site)
        # an unbatched array leaf this write changes (static leaves are neither)
        changes_shared = any(not b and isinstance(leaf, jax.ShapeDtypeStruct) and n is not f
                             for b, leaf, n, f in zip(batched, site.leaves, new, full))
        if not rows.whole and changes_shared:
            warn_at_user_line(
                f"{describe()} has no batch axis (one value serves every invoke, as position "
                "embeddings can), so this write in one invoke changes it for every invoke. "
                "Write it in a `tracer.invoke()` with no input to edit the whole batch."
            )
        self.current[site.key] = [rows.update(f, n, b) for f, n, b in zip(full, new, batched)]
        self.written[site.key] = line
        self.write_lines[site.order] = line
        self.replaced.add(site.key)

    def skip(self, module_input: Site, output: Site, rows: Rows, value: Any,
             describe: Callable[[], str]) -> None:
        """The module does not run; its output is ``value`` (whole batch)."""
        if not rows.whole:
            raise SiteError(at_user_line(
                f"{describe()}.skip() in an invoke that owns part of the batch: a "
                "skipped module is skipped for every row. Call it in an invoke that "
                "sees the whole batch (`tracer.invoke()` with no input)."
            ))
        if output.key in self.current:
            raise SiteError(at_user_line(
                f"{describe()}.skip() after the block read or wrote its output: a skipped "
                "module computes no output, so that value would silently be the skip value. "
                "Skip first, or read the module's input instead."
            ))
        new = self._checked(output, rows, value, describe, skip=True)
        self.skipped[module_input.key] = new
        self.replaced.add(output.key)
        self.write_lines[module_input.order] = user_line(2)
        self.current[output.key] = list(new)

    def watch(self, value: Any, writer: Callable[[Any], None], place: Hashable) -> None:
        """Write ``value`` with ``writer`` once the body assigns one of its fields;
        ``place`` is the site and rows it was read at."""
        self.watched.append((value, vars(value).copy(), writer, place))

    def unwatch(self, place: Hashable, value: Any) -> None:
        """``value`` is now the whole value at ``place``: a dataclass read there before is
        no longer the site's value, and its fields assigned from now on write nothing (as
        a torch module output object replaced by a hook). Called after :meth:`site`,
        which has written the fields assigned so far."""
        in_value = {id(x) for x in _nodes(value)}
        self.watched = [w for w in self.watched if w[3] != place or id(w[0]) in in_value]

    def write_fields(self) -> None:
        """Write the watched dataclass values whose fields the body assigned.

        Called before the body reaches any site and at the block's end, so a later
        read of the site sees the assignment, as in nnsight's ``output.aux = v``.
        """
        for value, fields, writer, _ in self.watched:
            now = vars(value)
            changed = [name for name, old in fields.items() if now[name] is not old]
            if changed:
                fields.update(now)
                try:
                    writer(copy.copy(value))
                except JnnsightError as err:  # named at the next site, not at the assignment
                    raise type(err)(
                        f"{err}\nThis write is the assignment of `.{changed[0]}` on a value read "
                        "from that site; a field assignment is applied when the block next "
                        "reaches a site, here."
                    ).with_traceback(err.__traceback__) from None

    def _checked(self, site: Site, rows: Rows, value: Any, describe: Callable[[], str],
                 skip: bool = False) -> list[Any]:
        leaves, treedef = jax.tree_util.tree_flatten(plain(value))
        if treedef != site.treedef:
            fix = ("give `.skip()` the whole output, e.g. `.skip((h,))` for a block's tuple; "
                   "in generation a decoder layer returns `(hidden, (keys, values))` with "
                   "its key/value cache, so pass the cache the layer was given (in `.inputs`) too"
                   if skip else "for one element of a tuple: `site.output[0] = v`")
            raise WriteError(at_user_line(
                f"{describe()} holds a value of structure {site.treedef}, and the "
                f"value written has structure {treedef}. Write a value of the same "
                f"structure ({fix})."
            ))
        out = []
        for leaf, want, batched in zip(leaves, site.leaves, self._batched(site)):
            if not isinstance(want, jax.ShapeDtypeStruct):
                if leaf is not want and leaf != want:
                    raise WriteError(at_user_line(
                        f"{describe()} has the static value {want!r} there; it "
                        f"cannot become {leaf!r}."
                    ))
                out.append(leaf)
                continue
            leaf = self.in_program(leaf)
            shape = rows.view_shape(want, batched)
            if tuple(leaf.shape) != shape or leaf.dtype != want.dtype:
                got = f"{leaf.dtype}{list(leaf.shape)}"
                need = f"{want.dtype}{list(shape)}"
                fix = (
                    f" Cast it with `.astype(jnp.{want.dtype})`."
                    if tuple(leaf.shape) == shape
                    else " Index or reshape it to that shape; a partial edit is "
                    "`site.output = site.output.at[...].set(v)`."
                )
                raise WriteError(at_user_line(
                    f"{describe()} expects {need} here, and the value written is {got}.{fix}"
                ))
            out.append(leaf)
        return out

    # gradients --------------------------------------------------------------------

    def begin_backward(self, loss: Any) -> int | None:
        """Open ``loss.backward()``: later ``.grad`` reads and writes belong to it."""
        if not self.is_ours(loss):
            raise WriteError(at_user_line(
                "`.backward()` differentiates a value computed in this block from module "
                f"values; this one ({type(loss).__name__}) was not. Compute the loss "
                "inside the block from `envoy.output` / `.input` values."
            ))
        if jnp.shape(loss) != ():
            raise WriteError(at_user_line(
                "`.backward()` differentiates a scalar; this value has shape "
                f"{list(jnp.shape(loss))}. Reduce it first (`loss.sum().backward()`, "
                "`loss.mean()`)."
            ))
        if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
            raise WriteError(at_user_line(
                f"`.backward()` differentiates a floating-point scalar; this one is "
                f"{jnp.result_type(loss)}, whose gradients are zero everywhere (an argmax, a "
                "comparison, a count). Use a differentiable loss, such as a log-probability."
            ))
        previous = self.backward
        target = next((i for i, t in enumerate(self.targets) if t is loss), None)
        if target is None:
            target = len(self.targets)
            self.targets.append(loss)
            self.target_lines[target] = user_line(2)
        self.backward = target
        return previous

    def _grad_key(self, value: Any) -> tuple[tuple[int, int, int], Site, int, Rows]:
        if self.backward is None:
            raise SiteError(at_user_line(
                "`.grad` exists inside a `with loss.backward():` block: it is the "
                "gradient of that loss."
            ))
        origin = self.origins.get(id(value))
        if any(value is p for p in self.params.values()):
            raise SiteError(at_user_line(
                "`.grad` of a parameter: in jnnsight, gradients with respect to parameters "
                "come from `jax.grad` of a function whose block runs on "
                "`model.bind(params)`, with `params` the argument (README, Gradients)."
            ))
        if origin is None or origin[0] is not value:
            raise SiteError(at_user_line(
                "`.grad` belongs to a value read from a module (`envoy.output`, `.input`, "
                "an element of them), as read, not to a value computed from one."
            ))
        _, site, j, rows, replaced = origin
        if not jnp.issubdtype(site.avals[j].dtype, jnp.inexact):
            raise SiteError(at_user_line(
                f"this value is {site.avals[j].dtype}: only floating-point values have a "
                "gradient (token ids and masks do not). Take `.grad` of the embedding's "
                "output instead."
            ))
        if replaced:
            raise SiteError(at_user_line(
                "`.grad` is the gradient of the value the model computes at a site, and this "
                "value was read after the block wrote (or skipped) that site (in a batched "
                "trace, an earlier invoke's write counts). Read the site before writing it "
                "(`h = envoy.output` first; put the invoke that reads `.grad` first): its "
                "`.grad` counts every use, the write included."
            ))
        return (site.order, j, self.backward), site, j, rows

    def grad(self, value: Any) -> Any:
        """d loss / d value for the open backward target, as the invoke sees it."""
        key, site, j, rows = self._grad_key(value)
        full = self.grads.get(key)
        if full is None:
            with set_current_trace(self.trace):
                full = grad_read_p.bind(site=site.order, leaf=j, target=self.backward,
                                        aval=site.avals[j])
            self.grads[key] = full
        return rows.view(full, self._batched(site)[j])

    def set_grad(self, value: Any, new: Any) -> None:
        """Replace the gradient that flows on, upstream of ``value``'s site."""
        key, site, j, rows = self._grad_key(value)
        current = self.grad(value)
        if new is None:
            raise WriteError(at_user_line(
                "`.grad = None` does not stop a gradient here: write zeros "
                "(`h.grad = jnp.zeros_like(h.grad)`)."
            ))
        new = self.in_program(new)
        if new.shape != current.shape or new.dtype != current.dtype:
            fix = (f"Index or reshape it to {list(current.shape)}." if new.shape != current.shape
                   else f"Cast it with `.astype(jnp.{current.dtype})`.")
            raise WriteError(at_user_line(
                f"the gradient here is {current.dtype}{list(current.shape)}, and the value "
                f"written is {new.dtype}{list(new.shape)}. {fix}"
            ))
        self.grads[key] = rows.update(self.grads[key], new, self._batched(site)[j])
        self.grad_written.setdefault(key, user_line(2))

    # parameters, saves -------------------------------------------------------------

    def param(self, index: int) -> Any:
        tracer = self.params.get(index)
        if tracer is None:
            with set_current_trace(self.trace):
                tracer = param_read_p.bind(leaf=index, aval=self.param_avals[index])
            self.params[index] = tracer
        return tracer

    def is_ours(self, value: Any) -> bool:
        return isinstance(value, core.Tracer) and getattr(value, "_trace", None) is self.trace

    def in_program(self, value: Any) -> Any:
        """A written value as a value of the block's program, so a later read of its site
        is one too (``.save()``, gradients): a concrete ``jax.Array`` (a value saved by an
        earlier trace, ``jnp.zeros(...)``) or a tracer of the user's own ``jax.jit``
        around the block is copied in, as ``jnp.asarray`` does numpy's."""
        if self.is_ours(value):
            return value
        with set_current_trace(self.trace):
            return jnp.array(value)

    def save(self, value: Any, internal: bool = False, gather: bool = False) -> Any:
        line = None if internal else user_line(2)

        def again(leaf: Any) -> bool:  # saved before with the other `gather`: save a copy
            return self.is_ours(leaf) and id(leaf) in self.saved and (id(leaf) in self.gathered) != gather

        if any(again(leaf) for leaf in jax.tree_util.tree_leaves(value)):
            value = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if again(x) else x, value)
        for leaf in jax.tree_util.tree_leaves(value):
            if self.is_ours(leaf):
                self.saved[id(leaf)] = leaf
                self.save_lines.setdefault(id(leaf), line)
                if internal:
                    self.internal.add(id(leaf))
                if gather:
                    self.gathered.add(id(leaf))
        return value

    def saves_in(self, value: Any) -> list[Any]:
        """The saved tracers ``value`` is or holds directly (in a tuple, list or dict)."""
        items = value.values() if isinstance(value, dict) else (
            value if isinstance(value, (tuple, list)) else (value,))
        return [v for v in items if isinstance(v, core.Tracer) and self.saved.get(id(v)) is v]

    def bind_names(self, step: int, namespace: Mapping[str, Any]) -> None:
        """Record the names a step loop's iteration at generation ``step`` bound."""
        self.loop_bindings.append(
            (step, {n: v for n, v in namespace.items() if not n.startswith("__") and self.saves_in(v)}))

    # the pass ---------------------------------------------------------------------

    def _finish(self) -> list[Any]:
        if self.unentered_backwards:
            _, line = next(iter(self.unentered_backwards.values()))
            raise JnnsightError(at_line(
                line, "`loss.backward()` does nothing by itself here: write `with "
                "loss.backward():` and read or edit `.grad` inside that block."
            ))
        self.write_fields()
        for finalize in self.finalizers:
            finalize()
        for key in self.written:
            site = self.table.get(key)
            site_write_p.bind(*[x for x in self.current[key] if is_array(x)], site=site.order)
        for key, leaves in self.skipped.items():
            site = self.table.get(key)
            site_skip_p.bind(*[x for x in leaves if is_array(x)], site=site.order)
        for site, leaf, target in self.grad_written:
            grad_write_p.bind(self.grads[(site, leaf, target)], site=site, leaf=leaf, target=target)
        for target, loss in enumerate(self.targets):
            backward_target_p.bind(loss, target=target)
        return list(self.saved.values())

    def run(self, bodies: Callable[[], None]) -> InterventionProgram:
        """Run ``bodies`` under ``jax.make_jaxpr``; the program they describe."""

        def program() -> list[Any]:
            with take_current_trace() as trace:
                self.trace = trace  # the make_jaxpr trace: it owns the block's tracers
            with active(self):
                bodies()
                return self._finish()

        closed = jax.make_jaxpr(program)()
        return InterventionProgram(
            closed, self.table, dict(self.read_lines), dict(self.write_lines), self.stopped,
            dict(self.grad_written), dict(self.target_lines),
        )


# -- the active builder -------------------------------------------------------------

_local = threading.local()


def current() -> Builder | None:
    """The builder of the abstract pass running in this thread, if any."""
    return getattr(_local, "builder", None)


@contextmanager
def active(builder: Builder) -> Iterator[Builder]:
    previous = current()
    _local.builder = builder
    try:
        yield builder
    finally:
        _local.builder = previous


# -- containers of site values that accept element writes -----------------------------


class _SiteContainer:
    """Element writes and ``.save()`` for a site's tuple, list or dict value."""

    _writer: Callable[[Any], None]
    _place: Hashable

    def _set(self, index: Any, value: Any) -> None:
        if isinstance(self, tuple):  # immutable: the elements written so far live beside it
            items = self.__dict__.setdefault("_items", list(plain(self)))
        else:
            items = plain(self)
        try:
            items[index] = value
        except IndexError:
            raise IndexError(at_user_line(
                f"element {index} is out of range: this value has {len(self)} elements."
            )) from None
        self._writer(tuple(items) if isinstance(self, tuple) else items)
        if isinstance(self, (list, dict)):  # a later read of this object sees the write
            child = writable(value, lambda new: self._set(index, new), self._place)
            (list if isinstance(self, list) else dict).__setitem__(self, index, child)

    def save(self, gather: bool = False) -> Any:
        """Keep the whole value after the block (as a plain tuple/list/dict); with
        ``gather=True``, as numpy arrays on the host (see :func:`jnnsight.save`)."""
        builder = current()
        value = plain(self)
        return value if builder is None else builder.save(value, gather=gather)


class SiteTuple(_SiteContainer, tuple):
    """A tuple site value: ``site.output[0] = v`` writes one element.

    Array habits on it (``output[:, -1]``, ``output.shape``, ``output * 2``), which
    transformers 5's tensor block outputs allow, are errors that say to take an
    element first, not tuple indexing or repetition.
    """

    __setitem__ = _SiteContainer._set

    def _not_an_array(self, what: str, example: str = ".output[0][:, -1]") -> str:
        return at_user_line(
            f"{what} is for arrays, and this value is a tuple of {len(self)} (a transformer "
            "block returns `(hidden, ...)`, as in transformers 4 and the nnsight README): "
            f"take an element first, e.g. `{example}`."
        )

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, tuple) or index is Ellipsis:  # h[:, -1], as on a tensor
            raise TypeError(self._not_an_array("indexing with several axes"))
        return tuple.__getitem__(self, index)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        # a gradient belongs to a module value, not to a slice of one
        example = ".output[0].grad" if name == "grad" else ".output[0][:, -1]"
        raise AttributeError(self._not_an_array(f"`.{name}`", example))

    def __mul__(self, other: Any) -> Any:
        raise TypeError(self._not_an_array("`*`"))

    def __add__(self, other: Any) -> Any:
        if isinstance(other, tuple) and not isinstance(other, SiteTuple):
            return tuple.__add__(self, other)  # joining tuples stays a tuple's `+`
        raise TypeError(self._not_an_array("`+`"))

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, tuple):
            return other + tuple(self)
        raise TypeError(self._not_an_array("`+`"))

    def __sub__(self, other: Any) -> Any:
        raise TypeError(self._not_an_array("`-`"))

    __rmul__ = __mul__
    __rsub__ = __sub__


class SiteList(_SiteContainer, list):
    """A list site value: ``site.output[0] = v`` writes one element."""

    __setitem__ = _SiteContainer._set


class SiteDict(_SiteContainer, dict):
    """A dict site value: ``site.output["key"] = v`` writes one entry."""

    __setitem__ = _SiteContainer._set


_PLAIN = {SiteTuple: tuple, SiteList: list, SiteDict: dict}
for _cls, _base in _PLAIN.items():
    if _base is dict:
        jax.tree_util.register_pytree_with_keys(
            _cls,
            lambda d: ([(jax.tree_util.DictKey(k), d[k]) for k in sorted(d)], tuple(sorted(d))),
            lambda keys, values: dict(zip(keys, values)),
            flatten_func=lambda d: ([d[k] for k in sorted(d)], tuple(sorted(d))),
        )
    else:
        jax.tree_util.register_pytree_node(
            _cls, lambda c: (list(c), None), lambda _, c, base=_base: base(c)
        )


def plain(value: Any) -> Any:
    """``value`` with every site container in it made the plain tuple/list/dict it stands for."""
    return jax.tree_util.tree_map(lambda leaf: leaf, value)


def _mutable_dataclass(value: Any) -> bool:
    """A dataclass pytree node whose fields can be assigned (not a frozen one)."""
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and not value.__dataclass_params__.frozen and hasattr(value, "__dict__")
            and not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(value)))


def _nodes(value: Any) -> Iterator[Any]:
    """``value`` and every tuple, list, dict and dataclass inside it."""
    yield value
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, (tuple, list)):
        children = value
    elif dataclasses.is_dataclass(value) and hasattr(value, "__dict__"):
        children = vars(value).values()
    else:
        return
    for child in children:
        yield from _nodes(child)


def writable(value: Any, writer: Callable[[Any], None], place: Hashable = None) -> Any:
    """``value`` with its tuples, lists and dicts made to accept element writes.

    ``site.output["aux"][0] = v`` writes the site with that one element replaced; so
    does ``site.output.aux = v`` on a registered dataclass that is not frozen (its
    fields are made writable in place, and the builder watches it). ``place`` is the
    site and rows the value was read at.
    """
    cls = next((c for c, base in _PLAIN.items() if type(value) is base), None)
    if cls is None:
        builder = current()
        if builder is not None and _mutable_dataclass(value):
            def field_writer(name: str) -> Callable[[Any], None]:
                def write(new: Any) -> None:  # `out.aux[0] = v` assigns the field `aux`
                    setattr(value, name, writable(new, write, place))
                return write

            for name in vars(value):
                setattr(value, name, writable(getattr(value, name), field_writer(name), place))
            builder.watch(value, writer, place)
        return value

    parent: list[Any] = []  # the wrapped value, once built: children write through it

    def child_writer(index: Any) -> Callable[[Any], None]:
        return lambda child: parent[0]._set(index, child)

    indices = value.keys() if isinstance(value, dict) else range(len(value))
    children = {i: writable(value[i], child_writer(i), place) for i in indices}
    wrapped = cls(children) if isinstance(value, dict) else cls(children[i] for i in indices)
    parent.append(wrapped)
    wrapped._writer, wrapped._place = writer, place
    return wrapped
