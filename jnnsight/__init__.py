"""jnnsight: nnsight for JAX.

Read and edit any module's inputs and outputs inside ``with model.trace(...)``;
the forward pass and every edit compile to one XLA program.

Example::

    >>> from jnnsight import NNsight
    >>> import jnnsight
    >>> model = NNsight(module, variables)
    >>> with model.trace(x):
    ...     h = model.block_1.output.save()
    ...     s = jnnsight.save(h.sum())
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax as _jax
import jax.numpy as _jnp
from jax import core as _core

from . import compilation_cache as _compilation_cache

from .envoy import Envoy, EnvoyList
from .errors import (
    at_user_line,
    CaptureError,
    CausalityError,
    JnnsightError,
    SiteError,
    UnsavedValueError,
    WriteError,
    user_line,
)
from .nnsight import NNsight
from .language import LanguageModel
from .tracing import program as _program
from .tracing.tracer import Cache, Tracer
from .interventions import LinearProbe, LowRankRotation, SteeringVector, at_positions
from .optimize import restore_checkpoint, save_checkpoint, train_step
from .activations import ActivationStore

__all__ = [
    "NNsight",
    "LanguageModel",
    "Envoy",
    "EnvoyList",
    "Tracer",
    "Cache",
    "save",
    "SteeringVector",
    "LowRankRotation",
    "LinearProbe",
    "at_positions",
    "train_step",
    "save_checkpoint",
    "restore_checkpoint",
    "ActivationStore",
    "JnnsightError",
    "CaptureError",
    "CausalityError",
    "SiteError",
    "UnsavedValueError",
    "WriteError",
]
__version__ = "0.1.0"

T = TypeVar("T")


def save(value: T, gather: bool = False) -> T:
    """Keep ``value`` (any pytree) after the block; returns it unchanged.

    After the block the variable holds plain ``jax.Array`` leaves, sharded as
    the compiled program left them on a mesh; with ``gather=True``, numpy
    arrays on the host instead. Outside a block this does nothing.

    Example::

        >>> with model.trace(x):
        ...     stats = jnnsight.save({"mean": h.mean(), "max": h.max()})
        ...     full = jnnsight.save(lm.model.layers[40].output[0], gather=True)
    """
    builder = _program.current()
    return value if builder is None else builder.save(value, gather=gather)


def _tracer_save(self: Any, gather: bool = False) -> Any:
    """``value.save()``: keep this value of a trace block after the block
    (``gather=True``: as a numpy array on the host)."""
    builder = _program.current()
    if builder is None or not builder.is_ours(self):
        raise JnnsightError(at_user_line(
            "`.save()` was called on a JAX value that does not belong to a running "
            "trace block. Call it inside `with model.trace(...):`."
        ))
    return builder.save(self, gather=gather)


class _Backward:
    """``with loss.backward():`` the block's ``.grad`` reads and writes are d loss / d value."""

    def __init__(self, loss: Any):
        self._loss = loss

    def __enter__(self) -> "_Backward":
        builder = _program.current()
        if builder is None:
            raise JnnsightError(at_user_line(
                "`.backward()` belongs inside a trace block, on a scalar computed there."
            ))
        builder.unentered_backwards.pop(id(self), None)
        self._previous = builder.begin_backward(self._loss)
        return self

    def __exit__(self, *exc: Any) -> None:
        _program.current().backward = self._previous


def _tracer_backward(self: Any, gradient: Any = None, retain_graph: bool = False) -> _Backward:
    """``with loss.backward():`` gradients of this scalar, read and edited with ``.grad``.

    ``gradient=g`` (torch's, for a value that is not a scalar) differentiates
    ``(value * g).sum()``, as torch does. ``retain_graph`` is accepted for nnsight
    code and means nothing here: a block may take several ``backward()`` of values
    of one forward.
    """
    if gradient is not None:
        if _jnp.shape(gradient) != _jnp.shape(self):
            raise WriteError(at_user_line(
                f"`backward(gradient=g)` needs `g` of the value's shape {list(_jnp.shape(self))}; "
                f"it has {list(_jnp.shape(gradient))}."
            ))
        self = (self * _jax.lax.stop_gradient(gradient)).sum()  # a constant seed, as in torch
    backward = _Backward(self)
    builder = _program.current()
    if builder is not None:  # a bare `loss.backward()` would do nothing: the block refuses it
        builder.unentered_backwards[id(backward)] = (backward, user_line(1))
    return backward


def _builder_for(what: str) -> Any:
    builder = _program.current()
    if builder is None:
        raise JnnsightError(at_user_line(
            f"`{what}` exists inside a trace block, in a `with loss.backward():` block."
        ))
    return builder


def _get_grad(self: Any) -> Any:
    """d loss / d this module value, in a ``with loss.backward():`` block."""
    return _builder_for(".grad").grad(self)


def _set_grad(self: Any, value: Any) -> None:
    _builder_for(".grad = ...").set_grad(self, value)


_core.Tracer.save = _tracer_save
_core.Tracer.backward = _tracer_backward
_core.Tracer.grad = property(_get_grad, _set_grad)
_compilation_cache.enable()
