"""Step 1, capture: read a ``with`` block's body and keep it from running inline.

``model.trace(...)`` and ``tracer.invoke(...)`` are context managers whose body
must run later, once every invoke's input is known. On entry the body's source
is read from ``linecache`` (files, IPython cells, Jupyter), compiled into a code
object with the user's filename and line numbers, and cached per call site. The
inline run is then skipped: a line tracer raises ``SkipBody`` at the body's
first line, and the block's ``__exit__`` swallows it.

Example::

    >>> import sys
    >>> from jnnsight.tracing.capture import Capture
    >>> class Later:
    ...     def __enter__(self):
    ...         self.capture = Capture.enter(sys._getframe(1))
    ...     def __exit__(self, *exc):
    ...         return self.capture.exit(exc[0])
"""

from __future__ import annotations

import ast
import linecache
import sys
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import CaptureError


class SkipBody(Exception):
    """Raised at a captured block's first line so that it does not run inline."""


@dataclass(frozen=True)
class CapturedBody:
    """The body of one ``with`` block, compiled with the user's lines."""

    code: types.CodeType
    filename: str
    header_line: int
    first_line: int | None  # the first line that does something; None for `pass` bodies
    changes: frozenset[str] = frozenset()  # the names the body binds, or changes the value of
    # each top-level statement's line, the names it reads and those it binds, outside
    # nested `with` bodies and the scopes of functions and comprehensions
    statements: tuple[tuple[int, frozenset[str], frozenset[str]], ...] = ()


_bodies: dict[tuple[types.CodeType, int], CapturedBody] = {}
_bodies_lock = threading.Lock()


def _header_end(node: ast.With) -> int:
    return getattr(node.items[-1].context_expr, "end_lineno", None) or node.lineno


def _with_node(tree: ast.AST, lineno: int) -> ast.With | None:
    """The innermost ``with`` statement whose header spans ``lineno``."""
    best = None
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and node.lineno <= lineno <= _header_end(node):
            if best is None or node.lineno >= best.lineno:
                best = node
    return best


def _compile_body(frame: types.FrameType) -> CapturedBody:
    filename = frame.f_code.co_filename
    lineno = frame.f_lineno
    linecache.checkcache(filename)  # a file edited and reloaded (`%autoreload`) since it was read
    source = "".join(linecache.getlines(filename, frame.f_globals))
    if not source:
        raise CaptureError(
            f"{filename}:{lineno}: jnnsight reads a trace block's source to run it "
            "later, and this code has none (it was typed into a bare `python` "
            "prompt, or passed to exec/eval as a string). Put the block in a file "
            "or a notebook cell, or use the function form: "
            "`fn = model.intervene(body)` with `body` a plain Python function."
        )
    tree = ast.parse(source, filename)
    node = _with_node(tree, lineno)
    if node is None:
        raise CaptureError(
            f"{filename}:{lineno}: no `with` statement was found at this line, so "
            "the block's body cannot be read (is the file edited since it was "
            "imported?). Enter traces with a `with` statement."
        )
    first = node.body[0].lineno
    if first <= _header_end(node):
        raise CaptureError(
            f"{filename}:{lineno}: the block's body is on the line of its `with` "
            "statement. Put the body on lines of its own."
        )
    module = ast.Module(body=node.body, type_ignores=[])
    try:
        code = compile(module, filename, "exec", dont_inherit=True)
    except SyntaxError as err:
        raise CaptureError(
            f"{filename}:{err.lineno}: `{(err.text or '').strip()}`: {err.msg} "
            "inside a trace block. A block's body runs as its own piece of code: "
            "save values in the block and `return`/`break`/`continue` after it."
        ) from None
    doing = [n for n in node.body if not _is_no_op(n)]
    if doing and isinstance(doing[0], (ast.Try, getattr(ast, "TryStar", ast.Try))):
        # CPython does not hand an exception raised at a `try:` line to the enclosing
        # `with`, and one raised inside the `try` would meet the user's handlers.
        raise CaptureError(
            f"{filename}:{doing[0].lineno}: a trace block cannot begin with `try:` "
            "(jnnsight stops the block's inline run at its first statement, and Python "
            "gives it no safe place there). Put the `try` around the `with` block, or "
            "another statement before it."
        )
    return CapturedBody(code, filename, node.lineno, doing[0].lineno if doing else None,
                        _changes(node.body), tuple((n.lineno, *_uses(n)) for n in node.body))


# methods that change a Python container in place
_MUTATORS = frozenset({"append", "extend", "insert", "update", "setdefault", "add", "pop",
                       "popitem", "clear", "remove", "discard", "sort", "reverse"})


def _changes(nodes: list[ast.stmt]) -> frozenset[str]:
    """The names ``nodes`` bind (``x = ...``, ``for x in``, ``del x``) or change the
    container of (``x[k] = v``, ``x.append(v)``); an attribute set (``self.h = v``) is
    not counted: ``self`` is not a value the trace's body would read stale."""
    found: set[str] = set()
    for node in (n for statement in nodes for n in ast.walk(statement)):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            found.add(node.id)
        elif isinstance(node, ast.Subscript) and not isinstance(node.ctx, ast.Load) \
                and isinstance(node.value, ast.Name):
            found.add(node.value.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in _MUTATORS and isinstance(node.func.value, ast.Name):
            found.add(node.func.value.id)
    return frozenset(found)


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _uses(node: ast.AST) -> tuple[frozenset[str], frozenset[str]]:
    """The names ``node`` reads and binds, leaving out the bodies of ``with`` blocks in it
    (a trace's invokes: their code runs later, on its own), of functions and classes
    (they run when called), and the names a comprehension binds for itself."""
    if isinstance(node, ast.Name):
        one = frozenset((node.id,))
        return (one, frozenset()) if isinstance(node.ctx, ast.Load) else (frozenset(), one)
    if isinstance(node, _SCOPES):
        name = getattr(node, "name", None)
        return frozenset(), frozenset((name,)) if name else frozenset()
    if isinstance(node, ast.With):
        parts = [part for item in node.items
                 for part in (item.context_expr, item.optional_vars) if part is not None]
    else:
        parts = list(ast.iter_child_nodes(node))
    uses = [_uses(part) for part in parts]
    reads = frozenset().union(*(r for r, _ in uses))
    binds = frozenset().union(*(b for _, b in uses))
    if isinstance(node, _COMPREHENSIONS):  # its targets are its own locals
        return reads - binds, frozenset()
    return reads, binds


def _is_no_op(node: ast.stmt) -> bool:
    """``pass``, ``...`` or a docstring: Python gives them no line to stop at."""
    return isinstance(node, ast.Pass) or (
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    )


def captured_body(frame: types.FrameType) -> CapturedBody:
    """The compiled body of the ``with`` block at ``frame``'s current line."""
    key = (frame.f_code, frame.f_lineno)
    body = _bodies.get(key)
    if body is None:
        # One thread at a time: CPython's AST-to-code conversion is not thread-safe.
        with _bodies_lock:
            body = _bodies.get(key)
            if body is None:
                body = _bodies[key] = _compile_body(frame)
    return body


@dataclass
class Capture:
    """A captured block: its body, and the tracer to restore at exit."""

    body: CapturedBody
    frame: types.FrameType
    previous_trace: Callable[..., Any] | None
    previous_frame_trace: Callable[..., Any] | None

    @classmethod
    def enter(cls, frame: types.FrameType) -> "Capture":
        """Capture the block at ``frame`` and arrange for its body to be skipped."""
        body = captured_body(frame)
        previous, previous_frame = sys.gettrace(), frame.f_trace
        if body.first_line is None:
            return cls(body, frame, previous, previous_frame)  # nothing to skip: the body does nothing
        first = body.first_line

        def skip(frame: types.FrameType, event: str, arg: Any) -> Any:
            if event == "line" and frame.f_lineno >= first:
                raise SkipBody
            return skip

        sys.settrace(_no_trace)
        frame.f_trace = skip
        return cls(body, frame, previous, previous_frame)

    def exit(self, exc_type: type[BaseException] | None) -> bool:
        """Undo the skip; True where the block is ours to run (its body was skipped)."""
        self.frame.f_trace = self.previous_frame_trace
        sys.settrace(self.previous_trace)
        return exc_type is SkipBody or (exc_type is None and self.body.first_line is None)

    def namespace(self) -> dict[str, Any]:
        """The names the body can see: the frame's globals, then its locals."""
        frame = self.frame
        if frame.f_locals is frame.f_globals:
            return frame.f_globals
        return {**frame.f_globals, **frame.f_locals}


def _no_trace(frame: types.FrameType, event: str, arg: Any) -> None:
    return None
