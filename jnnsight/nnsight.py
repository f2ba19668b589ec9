"""NNsight: wrap any flax.linen module and its variables; trace, scan, intervene.

Example::

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from jnnsight import NNsight
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(4, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
    >>> x = jnp.ones((2, 3))
    >>> model = NNsight(MLP(), MLP().init(jax.random.key(0), x))
    >>> with model.trace(x):
    ...     model.hidden.output = model.hidden.output * 0
    ...     y = model.output.save()
    >>> y.shape
    (2, 4)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import core

from .envoy import Envoy, _numbered_children
from .errors import JnnsightError, SiteError, UserLine, at_user_line, user_line
from .tracing import program as _program
from .tracing.collate import Batch, collate
from .tracing.discover import (
    SiteTable,
    SymbolicInputs,
    attribute_name,
    class_name,
    discover,
    instantiate,
    is_array,
    shape_key,
    symbolic_inputs,
    with_batch_axes,
)
from .tracing.execute import Executor
from .tracing.gradients import check_edits, split_backward
from .tracing.lru import LruCache
from .tracing.program import Builder
from .tracing.schedule import schedule, warn_unused_updates
from .tracing.tracer import Tracer


SYMBOLIC_SIZES = "jnnsight_symbolic_sizes"
"""A module class with ``jnnsight_symbolic_sizes: ClassVar[bool] = True`` declares that
the modules it calls, and how often, never depend on its input sizes (no Python branch
on a size): jnnsight then discovers its sites once per family of shapes on symbolic
sizes (see ``NNsight._discover``). JAX decides a comparison of symbolic sizes it cannot
prove as unequal, so a model that branches on, say, ``length % 4 == 0`` must not set it.
jnnsight's GPT-2 and Llama families set it."""

_NO_FAMILY = "no family"  # a model discovered shape by shape


@dataclass(frozen=True)
class _FirstShape:
    """The first shape of a family, as discovered: the check for its symbolic table."""

    sizes: dict[str, int]
    batch_symbol: str | None
    table: SiteTable


def _discover_family(module: nn.Module, variables: Any, symbolic: SymbolicInputs) -> SiteTable | None:
    """The site table on symbolic sizes, or None where the model cannot run on them
    (a Python branch on a size, a NumPy call on a shape)."""
    try:
        return discover(module, variables, symbolic.args, symbolic.kwargs)
    except Exception:  # noqa: BLE001 - any failure means: discover shape by shape
        return None


def _same_sites(a: SiteTable, b: SiteTable) -> bool:
    return [(s.key, s.treedef, s.leaves, s.batched) for s in a.sites] == \
        [(s.key, s.treedef, s.leaves, s.batched) for s in b.sites]


class NNsight(Envoy):
    """A flax.linen module with its variables, ready to be traced.

    Args:
      module: any ``flax.linen.Module``.
      variables: its variables, as ``module.init`` returns them.

    The model is the root envoy: ``model.block_1`` is a submodule's envoy,
    ``model.output`` the model's output inside a block.

    Example::

        >>> model = NNsight(module, variables)
        >>> print(model)
        >>> with model.trace(x):
        ...     h = model.block_1.output.save()
    """

    def __init__(self, module: nn.Module, variables: Any):
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"NNsight wraps a flax.linen Module, and got {type(module).__name__}. "
                "For a Hugging Face model id use `LanguageModel`."
            )
        state = {
            "module": module,
            "variables": variables,
            "_leaves": jax.tree_util.tree_leaves(variables),
            "_envoys": {},
            "_tables": LruCache(64),
            "_families": LruCache(64),  # site tables on symbolic sizes (see _discover)
            "_schedules": LruCache(256),
            "_executor": Executor(256),
            "_types": {(): class_name(module)},
            "_tree": {},
            "_lock": threading.Lock(),
            "_variables_key": shape_key(variables),
        }
        for name, value in state.items():
            object.__setattr__(self, name, value)
        Envoy.__init__(self, self, ())
        self._index_setup_children()  # first: definition order
        self._index_variables()

    # the module tree -----------------------------------------------------------------

    def _add_path(self, path: tuple[str, ...]) -> None:
        for i in range(len(path)):
            self._tree.setdefault(path[:i], {}).setdefault(path[i], None)

    def _index_variables(self) -> None:
        """Where each variable leaf lives: ``(collection, module path, name)`` by leaf index."""
        params: dict[tuple[str, ...], dict[str, int]] = {}
        places: list[tuple[str, tuple[str, ...], str]] = []
        flat, _ = jax.tree_util.tree_flatten_with_path(self.variables)
        for index, (keypath, _) in enumerate(flat):
            names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)
            collection, module_path, leaf = names[0], names[1:-1], names[-1]
            self._add_path(module_path)
            params.setdefault(module_path, {}).setdefault(leaf, index)
            places.append((collection, module_path, leaf))
        object.__setattr__(self, "_params", params)
        object.__setattr__(self, "_places", places)

    def _current_leaves(self) -> list[Any]:
        """The variables' leaves as they are now, for calls outside a block.

        ``model.variables`` is a plain dict a user may change in place
        (``lm.variables["params"]["lm_head"]["weight"] = w``): a block's forward
        takes the dict itself; an envoy called as a function, or a parameter read
        outside a block, reads it anew here (a flatten, not worth it per trace).
        """
        leaves = jax.tree_util.tree_leaves(self.variables)
        if len(leaves) != len(self._places):
            raise JnnsightError(at_user_line(
                f"model.variables now has {len(leaves)} arrays where it had "
                f"{len(self._places)}: arrays may be replaced in place, not added or removed. "
                "Wrap the new variables in a new model: `NNsight(module, variables)`."
            ))
        if any(a is not b for a, b in zip(leaves, self._leaves)):
            object.__setattr__(self, "_leaves", leaves)
            object.__setattr__(self, "_variables_key", shape_key(self.variables))
        return leaves

    def _index_setup_children(self) -> None:
        """Submodules defined in ``setup`` are known before any trace."""
        try:
            bound = self.module.bind(self.variables)
        except Exception:
            return

        def walk(module: nn.Module, path: tuple[str, ...], depth: int) -> None:
            if depth > 64:
                return
            try:
                module._try_setup()
            except Exception:
                return
            for value in vars(module).values():
                items = value if isinstance(value, (list, tuple)) else [value]
                for child in items:
                    if isinstance(child, nn.Module) and child.name and child.parent is module:
                        child_path = path + (child.name,)
                        self._add_path(child_path)
                        self._types[child_path] = class_name(child)
                        walk(child, child_path, depth + 1)

        walk(bound, (), 0)

    def _has_module(self, path: tuple[str, ...]) -> bool:
        """Whether a module sits at ``path`` (``()`` is the model; the tree holds a
        parent only where it exists, so the whole path is checked)."""
        return not path or path[-1] in self._tree.get(path[:-1], ())

    def _children(self, path: tuple[str, ...]) -> list[str]:
        """Child names in the order the model defines (or first calls) them."""
        return list(self._tree.get(path, ()))

    def _envoy(self, path: tuple[str, ...]) -> Envoy:
        envoy = self._envoys.get(path)
        if envoy is None:
            envoy = self._envoys.setdefault(path, Envoy(self, path))
        return envoy

    def _param_index(self, path: tuple[str, ...], name: str) -> int | None:
        return self._params.get(path, {}).get(name)

    def _param_names(self, path: tuple[str, ...]) -> list[str]:
        return sorted(self._params.get(path, {}))

    def _tree_repr(self, path: tuple[str, ...]) -> str:
        leaves = self._current_leaves()

        def runs(p: tuple[str, ...], names: list[str], indent: str) -> list[tuple[list[int], list[str]]]:
            """Numbered children ``names`` of ``p`` as runs that render alike: (numbers, lines)."""
            found: list[tuple[list[int], list[str]]] = []
            for name in names:
                sub, number = render(p + (name,), indent), int(name.rsplit("_", 1)[1])
                if found and found[-1][1] == sub:
                    found[-1][0].append(number)
                else:
                    found.append(([number], sub))
            return found

        def render(p: tuple[str, ...], indent: str) -> list[str]:
            type_name = self._types.get(p, "Module")
            children = self._children(p)
            detail = ", ".join(
                f"{n}={list(jnp.shape(leaves[self._param_index(p, n)]))}"
                for n in self._param_names(p)
            )
            if not children:
                return [f"{type_name}({detail})"]
            lines = [f"{type_name}("]
            numbered = _numbered_children(children)
            group_of = {c: base for base, names in numbered.items() for c in names}
            for child in children:
                base = group_of.get(child)
                if base is None:
                    sub = render(p + (child,), indent + "  ")
                    lines.append(f"{indent}  ({attribute_name(child, not p)}): {sub[0]}")
                    lines.extend(sub[1:])
                elif child == numbered[base][0]:  # a line per run of equal layers
                    for numbers, sub in runs(p, numbered[base], indent + "  "):
                        if len(numbers) == 1:
                            head = f"[{numbers[0]}]): "
                        elif numbers == list(range(numbers[0], numbers[-1] + 1)):
                            head = f"[{numbers[0]}-{numbers[-1]}]): {len(numbers)} x "
                        else:
                            head = f"[{','.join(map(str, numbers))}]): {len(numbers)} x "
                        lines.append(f"{indent}  ({attribute_name(base, not p)}{head}{sub[0]}")
                        lines.extend(sub[1:])
            lines.append(f"{indent})")
            return lines

        return "\n".join(render(path, ""))

    # the engine -----------------------------------------------------------------------

    def _check_input(self, args: tuple, kwargs: dict, line: UserLine | None) -> None:
        """What can be told of one invoke's input when it is given, before the block
        runs: nothing, for a module whose ``__call__`` takes any arguments."""

    def _collate(self, inputs: list[tuple[tuple, dict] | None], lines: list) -> Batch:
        """Step 2 for this model: arrays are concatenated along axis 0."""
        return collate(inputs, lines)

    def _site_table(self, variables: Any, batch: Batch, families: bool = True
                    ) -> tuple[Any, SiteTable, list[core.ShapedArray]]:
        """The sites of this forward and the parameters' abstract values, cached by shapes.

        Returns the cache key too: site numbers mean something only with their table.
        ``families=False`` discovers the shape as it is (see :meth:`_discover`).
        """
        own = variables is self.variables
        variables_key = self._variables_key if own else shape_key(variables)
        split = not all(rows.whole for rows in batch.rows)
        key = (variables_key, shape_key((batch.args, batch.kwargs)), split, batch.shared)
        entry = self._tables.get(key)
        if entry is None:
            table = (self._discover(variables, variables_key, batch, split) if families
                     else self._discover_concrete(variables, batch, split))
            avals = [core.ShapedArray(jnp.shape(x), x.dtype)
                     for x in jax.tree_util.tree_leaves(variables)]
            entry = self._tables.put(key, (key, table, avals))
            with self._lock:
                for path, info in table.modules.items():
                    self._add_path(path)
                    self._types[path] = info.type_name
        return entry

    def _discover(self, variables: Any, variables_key: Any, batch: Batch, split: bool) -> SiteTable:
        """The site table of a forward on ``batch``'s shapes.

        For a model that declares it (:data:`SYMBOLIC_SIZES`), inputs that differ
        only in sizes above 1 (prompt lengths, batch sizes) form a *family*. Its
        first shape is discovered as it is. At its second, the model is
        discovered once on symbolic sizes; if that table, at the first shape's
        sizes, equals the first shape's table, every later shape of the family is
        instantiated from it without tracing the model again. A model that cannot
        run on symbolic sizes, or whose sites differ, is discovered shape by shape.
        """
        if not getattr(type(self.module), SYMBOLIC_SIZES, False):
            return self._discover_concrete(variables, batch, split)
        rows = batch.rows[0].size
        symbolic = symbolic_inputs(batch.args, batch.kwargs)
        batch_symbol = None
        if symbolic is not None and split:
            batch_symbol = symbolic.symbol_of(rows)
            others = [d for i, x in enumerate(jax.tree_util.tree_leaves((batch.args, batch.kwargs)))
                      if is_array(x) for d in np.shape(x)[0 if i in batch.shared else 1:]]
            if batch_symbol is None or rows in others:  # the batch axis would be ambiguous
                symbolic = None
        if symbolic is None:
            return self._discover_concrete(variables, batch, split)
        family_key = (variables_key, symbolic.pattern, split, batch.shared)
        family = self._families.get(family_key)
        if isinstance(family, SiteTable):
            return instantiate(family, symbolic.sizes, batch_symbol)
        if family is None:  # the first shape: remember it to check the family against
            table = self._discover_concrete(variables, batch, split)
            self._families.put(family_key, _FirstShape(symbolic.sizes, batch_symbol, table))
            return table
        if isinstance(family, _FirstShape):
            found = _discover_family(self.module, variables, symbolic)
            if found is not None and _same_sites(
                    instantiate(found, family.sizes, family.batch_symbol), family.table):
                self._families.put(family_key, found)
                return instantiate(found, symbolic.sizes, batch_symbol)
            self._families.put(family_key, _NO_FAMILY)
        return self._discover_concrete(variables, batch, split)

    def _discover_concrete(self, variables: Any, batch: Batch, split: bool) -> SiteTable:
        table = discover(self.module, variables, batch.args, batch.kwargs)
        if split:
            table = with_batch_axes(table, self.module, variables, batch.args,
                                    batch.kwargs, batch.rows[0].size, batch.shared)
        return table

    def _run(
        self, variables: Any, batch: Batch, bodies: Callable[[], None], scan: bool = False,
        keep_output: bool = True,
    ) -> tuple[Any, dict[int, Any], Builder]:
        """Steps 3 to 6 for one batch: the output (``None`` unless ``keep_output``),
        saved values by tracer id, the builder."""
        table_key, table, avals = self._site_table(variables, batch)
        builder = Builder(table, avals)
        program = builder.run(bodies)
        program_key = (table_key, program.fingerprint)
        entry = self._schedules.get(program_key)
        if entry is None:
            warn_unused_updates(program)
            forward, backward = split_backward(program)
            plan = schedule(forward)
            if backward is not None:
                check_edits(plan, backward, program)
            entry = self._schedules.put(program_key, (plan, backward))
        plan, backward = entry
        saved = list(builder.saved)
        if scan:
            outs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in program.jaxpr.jaxpr.outvars]
            return None, dict(zip(saved, outs)), builder
        output, saves = self._executor(
            self.module, plan, program_key, variables,
            batch.args, batch.kwargs, self._outside(list(program.jaxpr.consts)), backward,
            keep_output,
        )
        return output, dict(zip(saved, saves)), builder

    def _outside(self, consts: list[Any]) -> list[Any]:
        """Arrays from outside the model (a block's, bound variables, an envoy call's
        arguments), as the compiled program takes them."""
        return consts

    def _move_names(self, namespace: dict[str, Any], names: frozenset[str]) -> dict[str, tuple[Any, Any]]:
        """Arrays a block's names hold, replaced in ``namespace`` by the copies the model
        computes with while the body runs: ``{name: (array, copy)}`` (none here)."""
        return {}

    def _outside_tree(self, tree: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return jax.tree_util.tree_unflatten(treedef, self._outside(leaves))

    def _apply_submodule(self, path: tuple[str, ...], args: tuple, kwargs: dict) -> Any:
        # The module as this forward configured it: a Flax module's fields can differ
        # between forwards with other arguments. Else the newest forward that ran it.
        builder = _program.current()
        info = builder.table.modules.get(path) if builder is not None else None
        if info is None:
            newest_first = reversed(list(self._tables.values()))
            info = next((t.modules[path] for _, t, _ in newest_first if path in t.modules), None)
        if info is None:
            raise SiteError(at_user_line(
                f"{self._envoy(path)._name} cannot be called before a trace has run "
                "the model once (jnnsight learns the module from that forward pass)."
            ))
        leaves = self._current_leaves() if builder is None else None
        # the module's own variables, and those of modules it borrows under their field
        owners = [(path, ()), *((owner, (field,)) for field, owner in info.borrowed)]
        sub: dict[str, Any] = {}
        for index, (collection, module_path, name) in enumerate(self._places):
            for owner, under in owners:
                if module_path[: len(owner)] == owner:
                    node = sub.setdefault(collection, {})
                    for part in (*under, *module_path[len(owner):]):
                        node = node.setdefault(part, {})
                    node[name] = builder.param(index) if builder is not None else leaves[index]
        if builder is None:
            args, kwargs = self._outside_tree((args, kwargs))
        return info.module.apply(sub, *args, **kwargs)

    # public ---------------------------------------------------------------------------

    def trace(self, *args: Any, **kwargs: Any) -> Tracer:
        """A block that runs the model on ``args`` with the body's reads and edits.

        With no input, the body holds ``tracer.invoke(x)`` blocks, batched into
        one forward.

        Example::

            >>> with model.trace(x) as tracer:
            ...     h = model.block_1.output.save()
            ...     model.block_2.output = h * 2
            ...     y = model.output.save()
        """
        return Tracer(self, args, kwargs)

    def scan(self, *args: Any, **kwargs: Any) -> Tracer:
        """Like ``trace``, but runs nothing: saved values are ``ShapeDtypeStruct``s.

        Example::

            >>> with model.scan(x):
            ...     shape = model.block_1.output.shape
            ...     h = model.block_1.output.save()
            >>> h
            ShapeDtypeStruct(shape=(1, 32, 768), dtype=float32)
        """
        return Tracer(self, args, kwargs, scan=True)

    def bind(self, variables: Any) -> "NNsight":
        """This model with other variables of the same structure: its blocks run on them.

        Inside a user's ``jax.jit``, pass the parameters in and trace through
        ``model.bind(params)``: the block then takes them as an input of the
        compiled program instead of baking the model's own arrays into it as
        constants. The bound model shares this one's envoys' paths, site tables and
        compiled programs; the block's body may keep using ``model.`` envoys. Outside
        a block, an envoy called as a function (``lm.lm_head(h)``) runs with the
        variables of the model it was reached from: call ``bound.lm_head(h)`` for
        the bound ones.

        Example::

            >>> @jax.jit
            ... def loss(vec, params, ids):
            ...     with lm.bind(params).trace(ids):
            ...         lm.model.layers[10].output[0] = lm.model.layers[10].output[0] + vec
            ...         logits = lm.lm_head.output.save()
            ...     return -jax.nn.log_softmax(logits[0, -1])[target]
        """
        structure = jax.tree_util.tree_structure(variables)
        if structure != jax.tree_util.tree_structure(self.variables):
            collections = self.variables.keys() if isinstance(self.variables, dict) else ()
            inner = next((c for c in collections if structure
                          == jax.tree_util.tree_structure(self.variables[c])), None)
            raise TypeError(at_user_line(
                f"bind() takes variables of the model's own structure, collections at the "
                f"top (as `model.variables`): this is `model.variables[{inner!r}]`'s, so pass "
                f"`{{{inner!r}: ...}}`." if inner is not None else
                "bind() takes variables of the model's own structure (as `model.variables`); "
                f"got {structure}."
            ))
        variables = self._outside_tree(variables)
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        object.__setattr__(bound, "variables", variables)
        object.__setattr__(bound, "_leaves", jax.tree_util.tree_leaves(variables))
        object.__setattr__(bound, "_variables_key", shape_key(variables))
        # its own envoys, so that bound.lm_head(h) applies the bound variables
        object.__setattr__(bound, "_envoys", {})
        Envoy.__init__(bound, bound, ())
        return bound

    def intervene(self, body: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
        """The engine as a function transform, without ``with``.

        ``body(*args, **kwargs)`` reads and writes sites like a block's body;
        what it returns is saved. The result is a pure function
        ``fn(variables, inputs, *args, **kwargs) -> (output, saves)``, where
        ``inputs`` is the forward's argument (a tuple for several; for a
        ``LanguageModel``, what ``lm.trace`` takes: ids, text or a tokenizer
        output), ready for ``jax.jit``, ``jax.grad``, ``jax.vmap`` and optax.

        Example::

            >>> def steer(vec):
            ...     model.block_1.output = model.block_1.output + vec
            ...     return model.block_2.output
            >>> fn = jax.jit(model.intervene(steer))
            >>> out, h2 = fn(model.variables, x, vec)
        """

        def fn(variables: Any, inputs: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            given = (inputs if isinstance(inputs, tuple) else (inputs,), {})
            batch = self._collate([given], [user_line()])
            variables = self._outside_tree(variables)  # on the model's mesh, as bind() puts them
            returned: list[Any] = []

            def bodies() -> None:
                builder = _program.current()
                builder.rows = batch.rows[0]
                returned.append(builder.save(body(*args, **kwargs)))

            output, values, builder = self._run(variables, batch, bodies)
            saves = jax.tree_util.tree_map(
                lambda leaf: values.get(id(leaf), leaf) if builder.is_ours(leaf) else leaf,
                returned[0],
            )
            return output, saves

        return fn
