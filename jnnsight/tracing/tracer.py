"""The ``with`` blocks: a Tracer runs the pipeline on exit; Invokers add inputs.

``model.trace(x)`` captures its body (step 1) and, on exit, collates the
inputs (2), discovers the sites (3), runs the body once against abstract values
to get the intervention program (4), schedules (5) and executes it (6), and
writes the saved values back into the caller's variables (7).

``model.trace()`` with no input holds invokes instead. Its body runs first with
the invoke bodies held back, so that every invoke's input is known before any
body runs; the invoke bodies then run in order, each seeing its own rows.

Example::

    >>> with model.trace() as tracer:
    ...     with tracer.invoke(x_a):
    ...         h = model.block_1.output
    ...     with tracer.invoke(x_b):
    ...         model.block_1.output = h          # cross-invoke, no barrier needed
    ...         y = model.output.save()
"""

from __future__ import annotations

import builtins
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import jax
from jax import core

from ..errors import (
    CaptureError,
    JnnsightError,
    SiteError,
    UserLine,
    advise,
    at_line,
    at_user_line,
    close_names,
    is_library_frame,
    user_line,
    warn_at_user_line,
)
from . import program as _program
from .cache import Cache, Entry
from .capture import Capture, SkipBody
from .collate import Batch
from .resolve import Unsaved, code_names, resolve_namespace, write_frame

if TYPE_CHECKING:
    from ..nnsight import NNsight
    from .program import Builder


class StopTrace(BaseException):
    """Raised by ``tracer.stop()``: the rest of the block's code does not run."""

    def __init__(self, line: UserLine | None):
        super().__init__()
        self.line = line


_local = threading.local()


def _is_program_object(value: Any) -> bool:
    """A model, an envoy, a tracer, a function or a module: shared by a trace's body and
    its invokes without being a value one of them computes."""
    return callable(value) or isinstance(value, (types.ModuleType, Tracer))


def _line_in(err: BaseException, code: types.CodeType) -> int | None:
    """The line of ``code`` that ``err`` was raised at (or passed through)."""
    tb, line = err.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code is code:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def collecting() -> "Tracer | None":
    return getattr(_local, "collecting", None)


@dataclass
class Invoke:
    """One invoke: its input, its compiled body, the names it sees."""

    inputs: tuple[tuple, dict] | None
    code: types.CodeType
    line: UserLine | None = None
    restore: dict[str, Any] = field(default_factory=dict)
    changes: frozenset[str] = frozenset()  # the names its body binds or changes


class Invoker:
    """``tracer.invoke(*args, **kwargs)``: one input of a batched trace.

    Example::

        >>> with model.trace() as tracer:
        ...     with tracer.invoke(x):
        ...         h = model.block_1.output.save()
    """

    def __init__(self, tracer: "Tracer", inputs: tuple[tuple, dict] | None):
        self.tracer = tracer
        self.inputs = inputs
        self.line = user_line()  # the user's `tracer.invoke(...)`, in case it is not entered
        self.entered = False

    def __enter__(self) -> "Invoker":
        self.entered = True
        if collecting() is not self.tracer:
            raise CaptureError(at_user_line(
                "`tracer.invoke(...)` belongs directly in the body of its own "
                "`model.trace()` (one with no input of its own)."
            ))
        self._capture = Capture.enter(sys._getframe(1))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._capture.exit(exc_type):
            return False
        namespace = self._capture.namespace()
        code = self._capture.body.code
        # Names the trace's own body changes later (a loop variable) are put back
        # to their value at this invoke before its body runs.
        snapshot = {n: namespace[n] for n in code_names(code) if n in namespace}
        line = UserLine(self._capture.body.filename, self._capture.body.header_line)
        self.tracer._invokes.append(Invoke(self.inputs, code, line, snapshot, self._capture.body.changes))
        return True


class Tracer:
    """The context of ``model.trace(...)`` / ``model.scan(...)``.

    Example::

        >>> with model.trace(x) as tracer:
        ...     h = model.block_1.output.save()
        ...     tracer.stop()                  # the forward stops after block_1
    """

    _spelling = "model.trace()"  # how the user opened the block, for messages

    def __init__(self, model: "NNsight", args: tuple, kwargs: dict, scan: bool = False):
        self.model = model
        self._inputs = (args, kwargs) if (args or kwargs) else None
        if self._inputs is not None:
            model._check_input(args, kwargs, user_line())
        self._scan = scan
        self._invokes: list[Invoke] = []
        self._invokers: list[Invoker] = []  # every `tracer.invoke(...)` the body made

    # inside the block ---------------------------------------------------------------

    def invoke(self, *args: Any, **kwargs: Any) -> Invoker:
        """One input of the batch; with none, the invoke sees the whole batch."""
        if self._inputs is not None:
            raise CaptureError(at_user_line(
                "this trace has its own input, so its body is the only invoke. "
                f"Use `{self._spelling}` with no input to batch several `tracer.invoke(x)`."
            ))
        if args or kwargs:
            self.model._check_input(args, kwargs, user_line())
        invoker = Invoker(self, (args, kwargs) if (args or kwargs) else None)
        self._invokers.append(invoker)
        return invoker

    def _refuse_reads_after_invokes(self, namespace: dict[str, Any], until: int | None = None) -> None:
        """Code of the trace's own body after an invoke runs before that invoke's body
        (the trace's body runs first, collecting invokes): refuse a line there that
        reads a name an earlier invoke's body binds or changes (a list it appends to),
        which it would see as it was before the invokes, unless a line between bound
        it anew. ``until``: the line an error stopped the body at; later ones never ran."""
        body = self._capture.body
        own = [inv for inv in self._invokes if inv.line is not None  # (not a helper's invokes)
               and inv.line.filename == body.filename and inv.line.lineno > body.header_line]
        bound_at: dict[str, int] = {}  # the line of the last statement that bound a name
        for lineno, reads, binds in body.statements:
            if until is not None and lineno > until:
                break
            stale = {name: inv for inv in own if inv.line.lineno < lineno
                     for name in inv.changes if bound_at.get(name, 0) < inv.line.lineno}
            shared = sorted(name for name in (reads - binds) & stale.keys()
                            if not _is_program_object(namespace.get(name, getattr(builtins, name, None))))
            if shared:
                raise CaptureError(at_line(UserLine(body.filename, lineno), (
                    f"this line of the trace's body reads `{shared[0]}`, which the invoke at "
                    f"line {stale[shared[0]].line.lineno} sets; but a trace's body runs first, "
                    "collecting its invokes, and their bodies run after it, in the forward: "
                    f"here `{shared[0]}` is still what it was before the invokes. Move this "
                    "line into the last invoke's body, or after the trace block.")))
            bound_at.update((name, lineno) for name in binds)

    def _refuse_bare_invokes(self) -> None:
        """A ``tracer.invoke(x)`` written without ``with`` adds no input: say so at its line."""
        bare = next((inv for inv in self._invokers if not inv.entered), None)
        if bare is not None:
            raise CaptureError(at_line(bare.line, (
                "`tracer.invoke(...)` opens a block: write `with tracer.invoke(x):` and indent "
                "the reads and edits of that input under it.")))

    def __getattr__(self, name: str) -> Any:
        if name in ("result", "iter", "all"):
            raise AttributeError(at_user_line(
                f"`tracer.{name}` belongs to generation: it exists in `lm.generate(...)` "
                "blocks, not in `model.trace(...)`. In a trace, `module.next()` addresses "
                "a module's next call (`model.h[0].next().output` is its second)."
            ))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def stop(self) -> None:
        """End the block here: later code is not run, and the forward stops after
        the last site the block needs."""
        builder = _program.current()
        if builder is None:
            raise CaptureError(at_user_line(
                "`tracer.stop()` belongs inside the block (inside an invoke's body when the "
                "trace has invokes)."
            ))
        builder.stopped = True
        raise StopTrace(user_line())

    def cache(self, modules: list[Any] | None = None, include_output: bool = True,
              include_inputs: bool = False) -> Cache:
        """Every module call's output (after edits) and, with ``include_inputs``, its
        inputs, after the block, keyed as nnsight keys them; with ``modules`` (envoys
        or paths), only theirs. See :mod:`jnnsight.tracing.cache`.

        Example::

            >>> with model.trace(x) as tracer:
            ...     cache = tracer.cache()
            >>> cache["model.block_1"].output, cache.model.block_1.output
        """
        builder = _program.current()
        if builder is None:
            raise CaptureError(at_user_line(
                "`tracer.cache()` belongs inside the block (inside an invoke's body when the "
                "trace has invokes)."
            ))
        cache = Cache(self.model)
        wanted = None
        if modules is not None:
            known = {cache.key_of(path) for path in builder.table.modules}
            wanted = {cache.key(m, known) for m in modules}
            unknown = sorted(wanted - known)
            if unknown:
                raise SiteError(at_user_line(
                    f"tracer.cache(modules=...): no module {unknown[0]!r} runs in this forward. "
                    + close_names(unknown[0], sorted(known))
                ))

        def fill() -> None:
            table = builder.table
            skipped = [(table.get(key).order, table.get((key[0], key[1], "output")).order)
                       for key in builder.skipped]
            for site in table.sites:
                path, call, kind = site.key
                key = cache.key_of(path)
                if (kind != "output" or site.lifted or (wanted is not None and key not in wanted)
                        or any(a < site.order < b for a, b in skipped)):
                    continue
                inputs = table.get((path, call, "input")) if include_inputs else None
                entry = Entry(
                    builder.save(site.unflatten(builder._leaves(site)), internal=True)
                    if include_output else None,
                    builder.save(inputs.unflatten(builder._leaves(inputs)), internal=True)
                    if inputs is not None else None,
                )
                dict.setdefault(cache, key, []).append(entry)
            object.__setattr__(cache, "_filled", True)

        builder.finalizers.append(fill)
        return cache

    # the block ----------------------------------------------------------------------

    def _execute(self, batch: Batch, bodies: Callable[[], None]) -> tuple[dict[int, Any], "Builder"]:
        """Steps 3 to 6: saved values by tracer id, and the builder of the abstract pass."""
        mutable = bool(batch.kwargs.get("mutable"))  # only then is the output read: flax's
        output, values, builder = self.model._run(  # (output, updates)
            self.model.variables, batch, bodies, scan=self._scan, keep_output=mutable)
        if mutable and output is not None:
            self._updates = output[1]
        return values, builder

    def _rebind(self, namespace: dict[str, Any], names: frozenset[str], values: dict[int, Any],
                builder: "Builder") -> None:
        """Names to bind anew before the saved values replace the block's tracers (a
        generation's step loops; nothing in a trace)."""

    @property
    def updates(self) -> Any:
        """The variable collections the forward updated, after a block whose forward
        flax was asked for them (``mutable=``), as ``module.apply`` returns them.

        Example::

            >>> with model.trace(x, True, mutable=["batch_stats"]) as tracer:
            ...     h = model.bn.output.save()
            >>> variables = {**model.variables, **tracer.updates}
        """
        if "_updates" not in self.__dict__:  # (an AttributeError would go to __getattr__)
            raise JnnsightError(at_user_line(
                "`tracer.updates` holds what a forward given `mutable=[...]` updated "
                "(`model.trace(x, mutable=['batch_stats'])`), after its block; this block's "
                "forward had no mutable collections, or was stopped early."
            ))
        return self._updates

    def __enter__(self) -> "Tracer":
        if _program.current() is not None or collecting() is not None:
            raise CaptureError(at_user_line(
                "a trace was started inside another trace's body. Traces do not nest: "
                "finish the first block and start the next after it, or batch inputs "
                "with `tracer.invoke(...)`."
            ))
        self._capture = Capture.enter(sys._getframe(1))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self._capture.exit(exc_type):
            return False
        try:
            self._run()
        except BaseException as err:
            _forget_skip(err)
            if not isinstance(err, JnnsightError):
                advise(err)
            raise err.with_traceback(_trimmed(err)) from err.__cause__
        finally:
            del self._capture  # the caller's frame, and through it its locals
            self._invokes.clear()
            self._invokers.clear()
        return True

    def _run(self) -> None:
        namespace = self._capture.namespace()
        body = self._capture.body
        names = code_names(body.code)  # the invoke bodies' names included
        before = {n: namespace[n] for n in names if n in namespace}
        if self._inputs is not None:
            invokes = [Invoke(self._inputs, body.code, UserLine(body.filename, body.header_line))]
        else:
            _local.collecting = self
            try:
                exec(body.code, namespace)
            except Exception as err:
                self._refuse_bare_invokes()  # the likelier causes of a failing line
                self._refuse_reads_after_invokes(namespace, _line_in(err, body.code))
                raise
            finally:
                _local.collecting = None
            self._refuse_bare_invokes()
            self._refuse_reads_after_invokes(namespace)
            if not self._invokes:
                raise JnnsightError(
                    f"{UserLine(body.filename, body.header_line)}\nthe trace has no input "
                    "and no `tracer.invoke(...)`: give it an input."
                )
            invokes = self._invokes
        batch = self.model._collate([inv.inputs for inv in invokes], [inv.line for inv in invokes])
        collected = {n: namespace[n] for n in names if n in namespace}

        def bodies() -> None:
            builder = _program.current()
            from_bodies: set[str] = set()  # names an invoke body bound: they flow on
            try:
                for number, (invoke, rows) in enumerate(zip(invokes, batch.rows), 1):
                    builder.rows = rows
                    builder.calls.clear()
                    for name, value in invoke.restore.items():
                        if name not in from_bodies:
                            namespace[name] = value
                    moved = self.model._move_names(namespace, names)
                    bound = {n: namespace.get(n) for n in names}
                    try:
                        exec(invoke.code, namespace)
                    except StopTrace as stop:
                        if number < len(invokes):
                            raise JnnsightError(at_line(stop.line, (
                                f"`tracer.stop()` in invoke {number} of "
                                f"{len(invokes)}: the invokes after it would never run. Call "
                                "it in the last invoke (all invokes share one forward, so "
                                "it stops that forward for every one).")))
                        return
                    finally:
                        from_bodies.update(n for n in names if namespace.get(n) is not bound[n])
                        for name, (array, copy) in moved.items():
                            if namespace.get(name) is copy:  # not bound anew by the body
                                namespace[name] = array
            finally:
                # Names only the trace's own body set keep their value from its end.
                for name in collected.keys() - from_bodies:
                    namespace[name] = collected[name]

        values, builder = self._execute(batch, bodies)
        line = UserLine(body.filename, body.header_line)
        found: set[int] = set()

        def swap(value: Any, name: str) -> Any:
            if not isinstance(value, core.Tracer):
                return value
            if builder.saved.get(id(value)) is value:
                found.add(id(value))
                result = values[id(value)]
                if getattr(result, "never_ran", False):
                    return result  # a generation step that never ran: nothing to gather
                if id(value) in builder.gathered:
                    if isinstance(result, core.Tracer):
                        raise JnnsightError(at_line(
                            builder.save_lines.get(id(value)),
                            "`.save(gather=True)` brings a value to the host, which a block "
                            "inside `jax.jit`/`vmap`/`grad` cannot do: save it without gather, "
                            "return it, and gather the result outside."
                        ))
                    return gather(result)
                return result
            return Unsaved(name, line) if builder.is_ours(value) else value

        self._rebind(namespace, names, values, builder)
        changed = resolve_namespace(namespace, names, before, swap)
        write_frame(self._capture.frame, namespace, changed)
        # What a name held at a step loop's iteration is not lost: the loop rebinds it.
        looped = {id(v) for _, bound in builder.loop_bindings
                  for value in bound.values() for v in builder.saves_in(value)}
        lost = [i for i in builder.saved if i not in found and i not in builder.internal
                and i not in looped]
        if lost:
            warn_at_user_line(
                f"{builder.save_lines[lost[0]]}\n{len(lost)} saved value(s) of this block "
                "ended up in no variable jnnsight writes back (saved values reach the names "
                "the block binds, lists, tuples and dicts in them, and attributes of your "
                "objects that the block names): a name bound again later in the block, or "
                "a save that was not assigned. Keep each value you need under its own name."
            )


def gather(value: Any) -> Any:
    """``value`` as numpy on this host, whole: in a multi-host run, gathered from every
    process (each must make the same call, as they run the same block)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(value, tiled=True)
    return jax.device_get(value)


def _forget_skip(err: BaseException) -> None:
    """Cut the ``SkipBody`` that stopped the inline run out of ``err``'s chain.

    The body runs while Python handles it, so every error of the body has it as
    context, which a traceback would print first ("During handling of ...").
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err.__context__, SkipBody):
            err.__context__ = None
        err = err.__cause__ or err.__context__


def _trimmed(err: BaseException) -> types.TracebackType | None:
    """The traceback from the user's first frame on; for our errors, to their last."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    user = [i for i, t in enumerate(frames) if not is_library_frame(t.tb_frame)]
    if not user:
        return None  # raised by the library after the body ran: the message names the line
    start = user[0]
    stop = user[-1] if isinstance(err, (JnnsightError, AttributeError)) else len(frames) - 1
    kept = frames[start : stop + 1]
    for a, b in zip(kept, kept[1:]):
        a.tb_next = b
    kept[-1].tb_next = None
    return kept[0]
