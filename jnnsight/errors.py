"""Errors a user can meet, and where in the user's code they come from.

Every error names the user's line (``file.py:12``) and says the one change that
fixes it. Library frames are left out of what the user sees.

Example::

    >>> from jnnsight.errors import JnnsightError
    >>> issubclass(JnnsightError, Exception)
    True
"""

from __future__ import annotations

import difflib
import functools
import linecache
import os
import re
import sys
import types
import warnings
from dataclasses import dataclass

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class JnnsightError(Exception):
    """Base class of every error jnnsight raises for a user's mistake."""


class CausalityError(JnnsightError):
    """A write depends on a value the forward pass computes only later."""


class SiteError(JnnsightError):
    """A module or site that does not exist or does not run in this forward."""


class WriteError(JnnsightError):
    """A write whose shape, dtype or structure differs from the site's value."""


class CaptureError(JnnsightError):
    """A block whose source cannot be read, or a trace started in a trace's body."""


class UnsavedValueError(JnnsightError):
    """A value of a block used after the block, though it was not saved."""


@dataclass(frozen=True)
class UserLine:
    """A place in the user's code: file, line number and the line's text."""

    filename: str
    lineno: int

    @property
    def text(self) -> str:
        return linecache.getline(self.filename, self.lineno).strip()

    def __str__(self) -> str:
        text = self.text
        where = f"{os.path.basename(self.filename)}:{self.lineno}"
        return f"{where}: `{text}`" if text else where


def is_library_frame(frame: types.FrameType) -> bool:
    """True for frames of jnnsight, JAX or flax, which a user does not write."""
    return is_library_file(frame.f_code.co_filename)


@functools.lru_cache(maxsize=4096)
def is_library_file(filename: str) -> bool:
    """True for files of jnnsight, JAX or flax."""
    return (
        filename.startswith(_PACKAGE_DIR)
        or f"{os.sep}jax{os.sep}" in filename
        or f"{os.sep}flax{os.sep}" in filename
        or f"{os.sep}jaxlib{os.sep}" in filename
        or filename.startswith("<frozen ")
    )


def user_line(depth: int = 1) -> UserLine | None:
    """The innermost frame on the stack that belongs to the user's code."""
    frame: types.FrameType | None = sys._getframe(depth)
    while frame is not None and is_library_frame(frame):
        frame = frame.f_back
    if frame is None:
        return None
    return UserLine(frame.f_code.co_filename, frame.f_lineno)


def at_line(line: UserLine | None, message: str) -> str:
    """Prefix ``message`` with ``line``, where there is one."""
    return f"{line}\n{message}" if line is not None else message


def at_user_line(message: str) -> str:
    """Prefix ``message`` with the user's current line, where one is found."""
    return at_line(user_line(2), message)


def warn_at_user_line(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's innermost line, however deep the call."""
    line = user_line(2)
    if line is None:
        warnings.warn(message, category, stacklevel=2)
    else:
        warn_at(line, message, category)


def warn_at(line: UserLine, message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to ``line``."""
    warnings.warn_explicit(message, category, line.filename, line.lineno)


# What a block's body most often gets wrong, coming from torch and nnsight: the error
# JAX or Python raises, recognized by its message, and the jnnsight way to write it.
_BODY_ADVICE = (
    (("JAX arrays are immutable", "does not support item assignment"),
     "jnnsight: a value read in a block is a JAX array. Write an edit back to its site: "
     "`envoy.output = envoy.output.at[:, -1].set(v)` (rebinding a name, `h = h.at[...]"
     ".set(v)`, changes nothing in the model)."),
    (("TracerBoolConversionError", "ConcretizationTypeError", "TracerArrayConversionError",
      "TracerIntegerConversionError"),
     "jnnsight: a block's body runs once, on abstract values, before the forward: Python "
     "`if`, `while`, `int()`, `float()` and numpy cannot look at a value's numbers. Use "
     "`jnp.where(cond, a, b)` or `jax.lax.cond`, or save the value and use numpy after the "
     "block; shapes (`h.shape`) are known and can be branched on."),
    (("'Tensor'", "must be Tensor", "__dlpack_device__"),
     "jnnsight: torch tensors do not mix with JAX values. Convert them first: "
     "`jnp.asarray(t.detach().cpu().numpy())`, and use `jnp` / `jax.nn` functions on "
     "values read in the block."),
    (re.compile(r"\w*(Tracer|ArrayImpl|Array)'?( object)? has no attribute "
                r"'?(cpu|numpy|detach|clone|value|to|size|dim)'?$", re.M),
     "jnnsight: a value read in a block is a JAX array, not a torch tensor or proxy: it has "
     "no `.cpu()`, `.detach()`, `.clone()`, `.numpy()` or `.value`. Use it as it is (an "
     "edit never changes a value already read, so no clone is needed; `h.shape[-1]` for a "
     "size); after the block a saved value is a `jax.Array` (`np.asarray(h)` for numpy)."),
    (("has no attribute 'grad'", "has no attribute 'backward'"),
     "jnnsight: `.grad` and `.backward()` exist inside the block, on values read there: "
     "`with loss.backward(): g = h.grad.save()`, then use `g` after the block."),
    (("Mesh for all inputs should be equal",),
     "jnnsight: an array placed on your own mesh met the model's values, which live on "
     "`lm.mesh` (your mesh's devices, with automatic axes). Arrays a block's names hold "
     "are moved there for you; one reached through a list, a dict, an attribute or a "
     "function's closure is not. Place it on `lm.mesh` "
     "(`jax.device_put(x, NamedSharding(lm.mesh, spec))`), or bind it to a name in the block."),
    (("should match the aval mesh",),
     "jnnsight: the block runs inside `jax.set_mesh(...)` of a mesh with explicit axes "
     "(as `jax.make_mesh` makes them), and the model's values live on `lm.mesh`, whose "
     "axes are automatic. Run the block outside that context, or inside "
     "`jax.set_mesh(lm.mesh)`."),
    (("Array has been deleted",),
     "jnnsight: the model's parameters include an array that was deleted, most often by "
     "donation: `jnnsight.train_step` (or a `jax.jit` with `donate_argnums`) given "
     "`lm.variables` hands their buffers to the new parameters. Trace with "
     "`lm.bind(new_params)`, or give the step a copy "
     "(`jax.tree_util.tree_map(jnp.copy, lm.variables)`)."),
    (("ScopeCollectionNotFound",),
     "jnnsight: `NNsight(module, variables)` takes the variables as `module.init` returns "
     "them, collections at the top: `{'params': params}`, not `variables['params']`."),
    (("ModifyScopeVariableError",),
     "jnnsight: this forward updates a variable collection (BatchNorm's `batch_stats` in "
     "training). Ask for it as `module.apply` does: `model.trace(x, mutable=['batch_stats'])`; "
     "the updated collections are then `tracer.updates`."),
    (("InvalidRngError",),
     "jnnsight: this forward draws random numbers (Dropout in training). Give them as "
     "`module.apply` takes them: `model.trace(x, rngs={'dropout': jax.random.key(0)})`."),
    (("has no attribute 'save'", "save() was called outside"),
     "jnnsight: `.save()` exists on values read from the model; save any other value or "
     "pytree (a list, a dict, a dataclass) with `jnnsight.save(value)`."),
)


def advise(err: BaseException) -> None:
    """Add a note on the jnnsight way to an error a block's body raised, where one fits."""
    text = f"{type(err).__name__}: {err}"
    for needles, advice in _BODY_ADVICE:
        found = (needles.search(text) if isinstance(needles, re.Pattern)
                 else any(n in text for n in needles))
        if found and advice not in getattr(err, "__notes__", ()):
            err.add_note(advice)
            return


def close_names(name: str, candidates: list[str]) -> str:
    """A hint sentence listing the candidates that look like ``name``."""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return "Did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = ", ".join(repr(c) for c in candidates[:12])
    more = ", ..." if len(candidates) > 12 else ""
    return f"Known names: {shown}{more}." if candidates else "It has no children."
