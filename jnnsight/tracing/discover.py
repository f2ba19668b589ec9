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

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import numpy as np
from jax import core
from jax.extend.core import take_current_trace

from ..errors import JnnsightError

SiteKind = Literal["input", "output"]
SiteKey = tuple[tuple[str, ...], int, SiteKind]


def is_array(leaf: Any) -> bool:
    """Leaves a program can read and write; the rest are static Python values."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def is_int(value: Any) -> bool:
    """A Python or numpy integer (not a bool): a token id, a step, a count, a row."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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
      batched: per leaf, whether its axis 0 is the batch axis; None where not
        measured (a forward with one invoke never needs it).
      lifted: the module runs inside a flax lifted transform (``nn.scan``,
        ``nn.remat``, ``nn.vmap``, ...), whose values live in the transform's own
        trace: a block can neither read nor write them.
    """

    key: SiteKey
    order: int
    treedef: jax.tree_util.PyTreeDef
    leaves: tuple[Any, ...]
    batched: tuple[bool, ...] | None = None
    lifted: bool = False

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
    # modules it was given by an owner elsewhere in the tree: field name -> their path
    borrowed: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class SiteTable:
    """Every site of one forward pass, in forward order."""

    sites: tuple[Site, ...]
    modules: dict[tuple[str, ...], ModuleInfo] = field(repr=False)
    _by_key: dict[SiteKey, Site] = field(repr=False, compare=False)

    def get(self, key: SiteKey) -> Site | None:
        return self._by_key.get(key)

    def call_offset(self, path: tuple[str, ...], step: int) -> int:
        """The call index of ``path``'s first call at generation step ``step``: 0 here."""
        return 0

    def name(self, key: SiteKey) -> str:
        """How the user addresses the site ``key``: ``model.h[1].mlp.next().output``."""
        return site_name(key, self.modules.__contains__)

    def lifted(self, site: Site, name: str) -> str:
        """Why the site (shown to the user as ``name``) cannot be used, and what can."""
        path = site.key[0]
        enclosing = [self.get((path[:i], 0, "output")) for i in range(len(path) - 1, -1, -1)]
        outside = next((s.key[0] for s in enclosing if s is not None and not s.lifted), ())
        return (
            f"{name} runs inside a flax lifted transform (nn.scan, nn.remat, nn.vmap, ...): "
            "its values exist only inside that transform's own trace, so a block can neither "
            f"read nor write them. Use `{self.name((outside, 0, 'output'))}`, the first module "
            "outside it, or run the model without the transform (a Python loop over the layers for "
            "nn.scan, no nn.remat) to address them."
        )

    def missing(self, key: SiteKey, name: str) -> str:
        """Why the site ``key`` (shown to the user as ``name``) does not exist."""
        path, call, kind = key
        info = self.modules.get(path)
        ran = 0 if info is None else info.calls
        times = "once" if ran == 1 else f"{ran} times"
        which = f"call {call + 1} of it" if ran else "it"
        return (
            f"{name} is never reached: the module ran {times} in this "
            f"forward pass, so {which} has no {kind}. Check the inputs "
            "(does this forward call the module?) or the number of .next() calls."
        )


NUMBERED = re.compile(r"^(.*)_(\d+)$")  # h_1: the second of the list model.h


def class_name(module: nn.Module) -> str:
    """The name ``print(model)`` shows: the module's ``hf_class_name`` where it has one
    (a Llama-family module of a Qwen3 config is ``Qwen3...``), else its class's."""
    return getattr(module, "hf_class_name", None) or type(module).__name__


def list_items(path: tuple[str, ...], exists: Callable[[tuple[str, ...]], bool] | None = None
               ) -> list[tuple[str, str | None]]:
    """Each part of ``path`` as ``(name, index)``: ``("h", "1")`` for ``h_1``, an item of
    the list ``h``, where ``h_0`` exists too (``exists`` says which paths do; without
    it every ``name_<digits>`` is one); ``("ln_1", None)`` for GPT-2's ``ln_1``."""
    parts = []
    for i, part in enumerate(path):
        m = NUMBERED.match(part)
        listed = m is not None and (exists is None or exists(path[:i] + (f"{m[1]}_0",)))
        parts.append((m[1], m[2]) if listed else (part, None))
    return parts


SERVED_PREFIX = "E_"


# what a root envoy holds besides its class's attributes (NNsight's and LanguageModel's)
_ROOT_ATTRIBUTES = ("module", "variables", "mesh", "rules", "tokenizer", "pad_to_multiple_of")


@functools.cache
def _served(at_root: bool) -> frozenset[str]:
    from ..envoy import Envoy  # (envoy imports this module)
    from ..language import LanguageModel

    if not at_root:
        return frozenset(n for n in dir(Envoy) if not n.startswith("_"))
    return frozenset(n for n in (*dir(LanguageModel), *_ROOT_ATTRIBUTES) if not n.startswith("_"))


def attribute_name(name: str, at_root: bool = False) -> str:
    """The envoy attribute of the child (or list of children) ``name``: ``E_output`` for
    a submodule named ``output``, a name the envoy serves itself, as in nnsight.

    Example::

        >>> attribute_name("output"), attribute_name("mlp")
        ('E_output', 'mlp')
    """
    return SERVED_PREFIX + name if name in _served(at_root) else name


def module_name(path: tuple[str, ...], exists: Callable[[tuple[str, ...]], bool] | None = None) -> str:
    """How a user addresses a module: ``model.h[1].mlp`` for the path ``("h_1", "mlp")``
    (numbered children are a list, as the envoys give them; see :func:`list_items`)."""
    return "model" + "".join(
        f".{attribute_name(name, i == 0)}" + (f"[{index}]" if index is not None else "")
        for i, (name, index) in enumerate(list_items(path, exists)))


def site_name(key: SiteKey, exists: Callable[[tuple[str, ...]], bool] | None = None) -> str:
    """How a user addresses a site: ``model.h[1].mlp.next().output``."""
    path, call, kind = key
    return call_name(module_name(path, exists), call, kind)


def call_name(module: str, call: int, kind: str) -> str:
    """A site of the module the user addresses as ``module``: ``model.mlp.next().output``."""
    return module + ".next()" * call + f".{kind}"


def site_interceptor(
    on_input: Callable[[SiteKey, Any, tuple, dict], tuple[tuple, dict]],
    on_output: Callable[[SiteKey, Any, Any], Any],
    call_module: Callable[[SiteKey, Callable[[], Any]], Any] | None = None,
    counts: dict[tuple[str, ...], int] | None = None,
    root_method: str = "__call__",
) -> Callable[..., Any]:
    """A flax interceptor that numbers calls and hands each site to a callback.

    ``on_input`` may replace the arguments and ``on_output`` the output;
    ``call_module`` may run the module or not (``envoy.skip``). ``counts`` (each
    module's calls so far) is the caller's to advance past calls a skip leaves out.
    Submodules' sites are their ``__call__``s; the root's is ``root_method``, the
    method ``apply(..., method=)`` runs (see :func:`applied_method`).
    """
    counts = {} if counts is None else counts
    running: set[int] = set()  # the modules whose call is running

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        wanted = "__call__" if module.path else root_method
        called = context.method_name
        is_call = called == wanted or (wanted == ANY_METHOD and called != "setup")
        # A subclass's `super().__call__(x)` is the same call of the module, as
        # torch's hooks see one forward: only the outermost has sites.
        if not is_call or id(module) in running:
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        call = counts.get(path, 0)
        counts[path] = call + 1
        args, kwargs = on_input((path, call, "input"), module, args, kwargs)
        running.add(id(module))
        try:
            if call_module is None:
                out = next_fun(*args, **kwargs)
            else:
                out = call_module((path, call, "input"), lambda: next_fun(*args, **kwargs))
        finally:
            running.discard(id(module))
        return on_output((path, call, "output"), module, out)

    return interceptor


def applied_method(kwargs: dict) -> str:
    """The name of the method ``module.apply(variables, *args, **kwargs)`` runs:
    ``method=`` (a name or a function), else ``__call__``.

    Example::

        >>> applied_method({"method": "encode"}), applied_method({})
        ('encode', '__call__')
    """
    method = kwargs.get("method")
    if method is None:
        return "__call__"
    if isinstance(method, str):
        return method
    name = getattr(method, "__name__", None) or getattr(getattr(method, "func", None), "__name__", None)
    return ANY_METHOD if name in (None, "<lambda>") else name


ANY_METHOD = "*"  # `method=` a lambda or a partial of one: the root's outermost call


def _unbound_copy(module: nn.Module) -> nn.Module:
    """The module detached from its parent and variables, to apply it on its own."""
    return module.clone(parent=None, _deep_clone=True, _reset_names=True)


def _borrowed(module: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The module's fields that hold a module owned elsewhere (``Block(shared=self.dense)``
    in the parent's ``setup``), with that module's path: its parameters live there."""
    path = tuple(module.path)
    found = []
    for f in dataclasses.fields(module):
        value = getattr(module, f.name, None)
        # a list or tuple of modules is named field_0, field_1, ... as flax names them
        named = (list(zip([f"{f.name}_{i}" for i in range(len(value))], value))
                 if isinstance(value, (list, tuple)) else [(f.name, value)])
        for name, item in named:
            if f.name != "parent" and isinstance(item, nn.Module) and item.scope is not None:
                if tuple(item.path[:len(path)]) != path:
                    found.append((name, tuple(item.path)))
    return tuple(found)


def _is_abstract_array(leaf: Any) -> bool:
    return is_array(leaf) or isinstance(leaf, jax.ShapeDtypeStruct)


def discover(module: nn.Module, variables: Any, args: tuple, kwargs: dict) -> SiteTable:
    """The site table of ``module.apply(variables, *args, **kwargs)``.

    Inputs may be arrays or ``ShapeDtypeStruct``s; other leaves (flags,
    strings) stay static Python values. The caller caches the table by
    :func:`shape_key` of the inputs: a forward of the same shapes has the same
    sites.
    """
    sites: list[Site] = []
    modules: dict[tuple[str, ...], ModuleInfo] = {}
    outer: list[Any] = []  # the trace of the forward itself

    def add(key: SiteKey, value: Any) -> None:
        treedef, leaves = abstract_leaves(value)
        with take_current_trace() as trace:
            lifted = trace is not outer[0]
        sites.append(Site(key, len(sites), treedef, leaves, lifted=lifted))

    def on_input(key, mod, a, k):
        path, call, _ = key
        info = modules.get(path)
        if info is None:
            info = ModuleInfo(class_name(mod), 0, _unbound_copy(mod), _borrowed(mod))
        modules[path] = dataclasses.replace(info, calls=call + 1)
        add(key, (a, k))
        return a, k

    def on_output(key, mod, out):
        add(key, out)
        return out

    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    arrays = [x for x in leaves if _is_abstract_array(x)]

    def forward(variables, arrays):
        given = iter(arrays)
        a, k = jax.tree_util.tree_unflatten(
            treedef, [next(given) if _is_abstract_array(x) else x for x in leaves]
        )
        with take_current_trace() as trace:
            outer.append(trace)
        with nn.intercept_methods(site_interceptor(on_input, on_output,
                                                   root_method=applied_method(k))):
            return module.apply(variables, *a, **k)

    jax.eval_shape(forward, variables, arrays)
    return SiteTable(tuple(sites), modules, {s.key: s for s in sites})


@dataclass(frozen=True)
class SymbolicInputs:
    """A forward's inputs with every dimension above 1 a symbol; equal sizes share one.

    Attributes:
      pattern: hashable; equal for inputs that differ only in those sizes.
      args, kwargs: the inputs as ``ShapeDtypeStruct``s of symbolic shapes.
      sizes: each symbol's size in these inputs.
    """

    pattern: Any
    args: tuple
    kwargs: dict
    sizes: dict[str, int]

    def symbol_of(self, size: int) -> str | None:
        return next((name for name, value in self.sizes.items() if value == size), None)


def symbolic_inputs(args: tuple, kwargs: dict) -> SymbolicInputs | None:
    """``(args, kwargs)`` with symbolic sizes, or None where no dimension is above 1."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    values = sorted({int(d) for x in leaves if _is_abstract_array(x) for d in np.shape(x) if d > 1})
    if not values:
        return None
    names = [f"d{i}" for i in range(len(values))]
    # Sizes above 1 are known: comparisons with 1 (a branch on `length == 1`) are decided.
    symbols = dict(zip(values, jax.export.symbolic_shape(
        ", ".join(names), constraints=[f"{n} >= 2" for n in names])))
    name_of = dict(zip(values, names))
    pattern, symbolic = [], []
    for x in leaves:
        if _is_abstract_array(x):
            shape = tuple(symbols[d] if d > 1 else 1 for d in np.shape(x))
            pattern.append((tuple(name_of.get(d, 1) for d in np.shape(x)), np.dtype(x.dtype)))
            symbolic.append(jax.ShapeDtypeStruct(shape, x.dtype))
        else:
            pattern.append(x)
            symbolic.append(x)
    sym_args, sym_kwargs = jax.tree_util.tree_unflatten(treedef, symbolic)
    return SymbolicInputs((treedef, tuple(pattern)), sym_args, sym_kwargs,
                          dict(zip(names, values)))


def instantiate(table: SiteTable, sizes: dict[str, int], batch: str | None = None) -> SiteTable:
    """A table discovered on symbolic inputs, at the given sizes.

    With ``batch`` (a symbol), each leaf whose axis 0 is exactly that symbol is
    marked batched, as :func:`with_batch_axes` would measure.
    """

    def size(d: Any) -> Any:
        return int(d._evaluate(sizes)) if jax.export.is_symbolic_dim(d) else d

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(tuple(size(d) for d in x.shape), x.dtype)
        return size(x)

    def batched(x: Any) -> bool:
        return (isinstance(x, jax.ShapeDtypeStruct) and len(x.shape) >= 1
                and jax.export.is_symbolic_dim(x.shape[0]) and str(x.shape[0]) == batch)

    sites = tuple(
        dataclasses.replace(site, leaves=tuple(leaf(x) for x in site.leaves),
                            batched=None if batch is None else tuple(batched(x) for x in site.leaves))
        for site in table.sites
    )
    return SiteTable(sites, table.modules, {s.key: s for s in sites})


def with_batch_axes(table: SiteTable, module: nn.Module, variables: Any,
                    args: tuple, kwargs: dict, size: int,
                    shared: frozenset[int] = frozenset()) -> SiteTable:
    """``table`` with each site leaf marked batched or not.

    A leaf is batched when its axis 0 follows the batch: one more discovery at
    batch size ``size + 1`` tells, where looking at a shape alone cannot (a
    ``[length, width]`` position embedding with ``length == size``). Input leaves
    numbered in ``shared`` have no row per example and keep their shape.
    """

    def grown(index: int, leaf: Any) -> Any:
        if (index not in shared and is_array(leaf) and np.ndim(leaf) >= 1
                and np.shape(leaf)[0] == size):
            return jax.ShapeDtypeStruct((size + 1, *np.shape(leaf)[1:]), leaf.dtype)
        return leaf

    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    try:
        bigger = discover(module, variables, *jax.tree_util.tree_unflatten(
            treedef, [grown(i, leaf) for i, leaf in enumerate(leaves)]))
    except Exception as error:  # noqa: BLE001 - the model's own error, explained
        raise JnnsightError(
            f"this model fails on a batch one row larger ({size + 1} rows instead of "
            f"{size}): {type(error).__name__}: {error}\n"
            "When invokes split the batch, jnnsight runs the model abstractly once at one "
            "more row to tell which values are batched. Make the model run at any batch "
            "size, or trace one input at a time (one invoke, or `model.trace(x)`)."
        ) from error
    if [s.key for s in bigger.sites] != [s.key for s in table.sites]:
        raise JnnsightError(
            "this model runs different modules for a batch one row larger, so jnnsight "
            "cannot tell which values are batched, and invokes cannot be split into rows. "
            "Trace one input at a time."
        )
    sites = []
    for site, other in zip(table.sites, bigger.sites):
        batched = tuple(
            isinstance(a, jax.ShapeDtypeStruct) and len(a.shape) >= 1
            and a.shape[0] == size and b.shape[0] == size + 1
            for a, b in zip(site.leaves, other.leaves)
        )
        sites.append(dataclasses.replace(site, batched=batched))
    return SiteTable(tuple(sites), table.modules, {s.key: s for s in sites})


def static_key(value: Any) -> Any:
    """A non-array leaf of a forward's inputs as a key: by type and value (``2``,
    ``2.0`` and ``True`` are equal in Python and make different programs), a float by
    ``repr`` (``0.0 == -0.0``, and a NaN equals nothing, not even itself)."""
    return (type(value), repr(value)) if isinstance(value, float) else (type(value), value)


def shape_key(tree: Any) -> Any:
    """A hashable key of a pytree's structure, shapes, dtypes and static leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), x.dtype) if is_array(x) else static_key(x) for x in leaves)
