"""Trainable interventions: pytrees with a pure ``__call__``, applied at sites.

Each intervention is a ``flax.struct`` dataclass, so it is a pytree: ``jax.grad``
differentiates it, optax updates it, orbax saves it. Calling it on a site's value
gives the edited value, inside a block or a ``model.intervene`` body::

    h = lm.model.layers[10].output[0]
    lm.model.layers[10].output[0] = steer(h)

Where an intervention acts (positions, a subspace's size) is an array or a shape,
never a Python value baked into the program: moving it to other positions does
not compile again.

Example::

    >>> steer = SteeringVector.zeros(576)
    >>> rotation = LowRankRotation.random(jax.random.key(0), width=576, rank=4)
    >>> probe = LinearProbe.zeros(576, classes=2)
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from .errors import at_user_line


def at_positions(value: jax.Array, edited: jax.Array, positions: jax.Array | None) -> jax.Array:
    """``edited`` at the sequence ``positions`` (axis 1 of ``[batch, length, width]``), ``value`` elsewhere.

    ``positions`` is an int array of indices (negative counts from the end),
    ``[k]`` for every row or ``[batch, k]`` for each row its own, or a boolean mask
    ``[length]`` / ``[batch, length]``; None means every position.
    Indices outside ``-length .. length - 1`` edit nothing. Positions index the
    value's own axis 1: in a generation step after the prompt that axis has one
    position, so ``-1`` (the newest token) is the one that addresses every step.

    Example::

        >>> at_positions(h, h + v, jnp.array([-1]))     # the last position only
    """
    if positions is None:
        return edited
    positions = jnp.asarray(positions)
    length = value.shape[1]
    if positions.ndim not in (1, 2) or (positions.ndim == 2 and positions.shape[0] not in (1, value.shape[0])):
        raise ValueError(at_user_line(
            f"positions of shape {list(positions.shape)} do not fit a value of shape "
            f"{list(value.shape)}: give [k] indices for every row, [{value.shape[0]}, k] for "
            f"each row, or a boolean mask [{length}] / [{value.shape[0]}, {length}]."
        ))
    if positions.dtype == jnp.bool_:
        if positions.shape[-1] != length:
            raise ValueError(at_user_line(
                f"a boolean mask of positions has one entry per position: {length} here (axis "
                f"1 of the value, shape {list(value.shape)}), and this one has "
                f"{positions.shape[-1]}. In a generation step after the prompt the value has "
                "one position: there, give indices (`jnp.array([-1])`) instead of a mask."
            ))
        mask = positions
    elif not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(at_user_line(
            f"positions are integer indices or a boolean mask, not {positions.dtype}."
        ))
    else:
        index = jnp.where(positions < 0, positions + length, positions)
        index = jnp.where(index < 0, length, index)  # before the start: dropped too
        if index.ndim == 1:
            mask = jnp.zeros((length,), bool).at[index].set(True, mode="drop")
        else:  # each row its own indices
            rows = jnp.arange(index.shape[0])[:, None]
            mask = jnp.zeros((index.shape[0], length), bool).at[rows, index].set(True, mode="drop")
    mask = jnp.broadcast_to(mask if mask.ndim == 2 else mask[None], value.shape[:2])
    return jnp.where(mask[..., None], edited, value)


def _check_width(kind: str, width: int, value: jax.Array, made: str) -> None:
    """An intervention of ``width`` fits only values whose last axis is that wide."""
    if jnp.ndim(value) == 0 or jnp.shape(value)[-1] != width:
        raise ValueError(at_user_line(
            f"this {kind} is {width} wide, and the value it was given has shape "
            f"{list(jnp.shape(value))}: its last axis must be {width}. Make the {kind} as wide "
            f"as the site it acts on ({made})."
        ))


@flax.struct.dataclass
class SteeringVector:
    """``h + vector`` at the chosen positions: an additive steering vector.

    Example::

        >>> steer = SteeringVector.zeros(576)
        >>> lm.model.layers[10].output[0] = steer(lm.model.layers[10].output[0])
    """

    vector: jax.Array

    @classmethod
    def zeros(cls, width: int, dtype: Any = jnp.float32) -> "SteeringVector":
        return cls(jnp.zeros((width,), dtype))

    def __call__(self, value: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        if self.vector.shape[-1] != 1:  # (one number shifts every feature)
            _check_width("SteeringVector", self.vector.shape[-1], value,
                         "`SteeringVector.zeros(h.shape[-1])`")
        return at_positions(value, value + self.vector.astype(value.dtype), positions)


def orthonormal(weight: jax.Array) -> jax.Array:
    """Orthonormal columns spanning ``weight``'s ``[width, rank]``: QR, signs fixed.

    A parametrization, not a projection: any unconstrained ``weight`` gives an
    exactly orthonormal basis, so gradient steps on ``weight`` keep the basis
    orthonormal (to float32 rounding) with nothing to re-project. A bfloat16 or
    float16 ``weight`` (which QR does not take) is factored in float32; the basis
    has ``weight``'s type.
    """
    exact = jnp.promote_types(weight.dtype, jnp.float32)
    q, r = jnp.linalg.qr(weight.astype(exact))
    q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(exact)
    return q.astype(weight.dtype)


@flax.struct.dataclass
class LowRankRotation:
    """Distributed alignment search: interchange a learned ``rank``-dimensional subspace.

    ``basis = orthonormal(weight)`` is ``[width, rank]``; ``__call__(base, source)``
    replaces the base's coordinates in that subspace with the source's:
    ``base + basis @ (basis.T @ (source - base))``, the rotated-space interchange of
    Geiger et al. restricted to the first ``rank`` rotated dimensions. Start from
    :meth:`random`: a weight of lower rank than its columns (``jnp.zeros``) has no
    subspace to follow, and QR's gradient there is NaN.

    Example::

        >>> das = LowRankRotation.random(jax.random.key(0), width=64, rank=2)
        >>> patched = das(base_hidden, source_hidden)
    """

    weight: jax.Array

    @classmethod
    def random(cls, key: jax.Array, width: int, rank: int, dtype: Any = jnp.float32) -> "LowRankRotation":
        if not 1 <= rank <= width:
            raise ValueError(at_user_line(
                f"a rotation's rank is the dimension of its subspace: 1 to width ({width}), "
                f"got {rank}."
            ))
        return cls(jax.random.normal(key, (width, rank), dtype))

    @property
    def basis(self) -> jax.Array:
        return orthonormal(self.weight)

    def __call__(self, base: jax.Array, source: jax.Array,
                 positions: jax.Array | None = None) -> jax.Array:
        for value in (base, source):
            _check_width("LowRankRotation", self.weight.shape[0], value,
                         "`LowRankRotation.random(key, width=h.shape[-1], rank=...)`")
        basis = self.basis.astype(base.dtype)
        edited = base + (source - base) @ basis @ basis.T
        return at_positions(base, edited, positions)


@flax.struct.dataclass
class LinearProbe:
    """``value @ weight + bias``: a linear read-out of a site (it edits nothing).

    Example::

        >>> probe = LinearProbe.zeros(576, classes=2)
        >>> logits = probe(lm.model.layers[10].output[0][:, -1])
    """

    weight: jax.Array
    bias: jax.Array

    @classmethod
    def zeros(cls, width: int, classes: int, dtype: Any = jnp.float32) -> "LinearProbe":
        return cls(jnp.zeros((width, classes), dtype), jnp.zeros((classes,), dtype))

    def __call__(self, value: jax.Array) -> jax.Array:
        _check_width("LinearProbe", self.weight.shape[0], value,
                     "`LinearProbe.zeros(h.shape[-1], classes=...)`")
        return value @ self.weight.astype(value.dtype) + self.bias.astype(value.dtype)


__all__ = ["SteeringVector", "LowRankRotation", "LinearProbe", "at_positions", "orthonormal"]
