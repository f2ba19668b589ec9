"""Optimizing interventions: a jitted optax train step, and orbax checkpoints.

The model's parameters are an input of the step like the batch (frozen: no
gradient, no update), never constants baked into the compiled program, so one
compiled step serves any checkpoint of the same shapes.

Example::

    >>> def body(steer):
    ...     lm.model.layers[10].output[0] = steer(lm.model.layers[10].output[0])
    ...     return lm.lm_head.output
    >>> forward = lm.intervene(body)                  # a pure function of variables
    >>> def loss_fn(steer, variables, ids, target):
    ...     _, logits = forward(variables, ids, steer)
    ...     return -jax.nn.log_softmax(logits[:, -1])[:, target].mean()
    >>> optimizer = optax.adam(1e-2)
    >>> steer = SteeringVector.zeros(576)
    >>> opt_state = optimizer.init(steer)
    >>> step = train_step(loss_fn, optimizer)
    >>> steer, opt_state, loss = step(steer, opt_state, lm.variables, ids, target)
    >>> save_checkpoint("/tmp/run/step_100", {"steer": steer, "opt_state": opt_state})
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .errors import at_user_line


def train_step(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation
               ) -> Callable[..., tuple[Any, Any, jax.Array]]:
    """``step(trainable, opt_state, *args) -> (trainable, opt_state, loss)``, jitted.

    ``loss_fn(trainable, *args)`` returns a scalar; only ``trainable`` (any
    pytree: an intervention, a dict of them, a model's parameters) is
    differentiated and updated. One array at several leaves of ``trainable``, as
    tied embeddings are, is one parameter, as in torch: the first of those leaves
    gets the sum of their gradients (so an optimizer that looks across leaves, such
    as a global-norm clip, counts it once), and the new ``trainable`` has the first
    leaf's new array at all of them. The old ``trainable`` and ``opt_state``
    buffers are donated to the new ones (so ``lm.variables`` passed here can no
    longer be used by ``lm``: trace with ``lm.bind(new_params)``), except where
    arrays are shared: XLA cannot donate a buffer twice.
    """

    def scalar_loss(trainable: Any, *args: Any) -> jax.Array:
        loss = loss_fn(trainable, *args)
        if jnp.shape(loss) != ():
            raise TypeError(at_user_line(
                f"train_step's loss_fn {getattr(loss_fn, '__name__', loss_fn)!r} returned "
                f"shape {list(jnp.shape(loss))}: a loss is one number. Reduce it in loss_fn "
                "(`.mean()` over the batch)."
            ))
        return loss

    def step(ties: tuple[tuple[int, ...], ...], trainable: Any, opt_state: Any,
             *args: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(scalar_loss)(trainable, *args)
        if ties:  # the whole gradient at the first leaf, as one parameter's (a global
            # norm counts it once); the others follow the first after the update
            leaves, treedef = jax.tree_util.tree_flatten(grads)
            for group in ties:
                total = sum(leaves[i] for i in group)
                for i in group:
                    leaves[i] = total if i == group[0] else jnp.zeros_like(total)
            grads = jax.tree_util.tree_unflatten(treedef, leaves)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    donating = jax.jit(step, static_argnums=0, donate_argnums=(1, 2))
    keeping = jax.jit(step, static_argnums=0)

    @functools.wraps(step)
    def call(trainable: Any, opt_state: Any, *args: Any) -> tuple[Any, Any, jax.Array]:
        ties = _ties(trainable)
        leaves = [leaf for leaf in jax.tree_util.tree_leaves((trainable, opt_state))
                  if isinstance(leaf, jax.Array)]
        shared = len({id(leaf) for leaf in leaves}) < len(leaves)
        new, opt_state, loss = (keeping if shared else donating)(ties, trainable, opt_state, *args)
        return _retied(new, ties), opt_state, loss  # one array at tied leaves, as given

    return call


def _ties(tree: Any) -> tuple[tuple[int, ...], ...]:
    """The leaf positions of each array that stands at several leaves of ``tree``."""
    positions: dict[int, list[int]] = {}
    for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
        if isinstance(leaf, jax.Array):
            positions.setdefault(id(leaf), []).append(i)
    return tuple(tuple(group) for group in positions.values() if len(group) > 1)


def _retied(tree: Any, ties: tuple[tuple[int, ...], ...]) -> Any:
    """``tree`` with the leaf at each group's first position at all of its positions."""
    if not ties:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    for group in ties:
        for i in group[1:]:
            leaves[i] = leaves[group[0]]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_checkpoint(path: str | Path, tree: Any) -> Path:
    """Save a pytree of arrays (interventions, optimizer state, activations) with orbax.

    ``path`` is a folder that must not exist yet. Returns its absolute path.

    Example::

        >>> save_checkpoint("runs/steer/100", {"steer": steer, "opt_state": opt_state})
    """
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} exists: orbax writes a new folder; choose another path.")
    checkpointer = _checkpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return path


def restore_checkpoint(path: str | Path, like: Any = None) -> Any:
    """A pytree saved by :func:`save_checkpoint`.

    With ``like`` (a pytree of the same structure: arrays, or
    ``jax.ShapeDtypeStruct``s), the result has its structure, types and
    shardings (an intervention, an optax state; arrays placed as ``like``'s are,
    whatever the devices of the run that saved them), and one array wherever
    ``like`` has one array at several leaves (tied embeddings stay tied); without,
    nested dicts of arrays.

    Example::

        >>> state = restore_checkpoint("runs/steer/100", {"steer": steer, "opt_state": opt_state})
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}.")
    target = None if like is None else jax.tree_util.tree_map(_restored_as, like)
    restored = _checkpointer().restore(path, target)
    return restored if like is None else _retied(restored, _ties(like))


def _restored_as(x: Any) -> Any:
    """What orbax restores a leaf of ``like`` as: an array placed as ``x`` is; a Python
    number (a step count, a learning rate) as the number it was saved as."""
    if not hasattr(x, "shape"):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding_of(x))


def _sharding_of(x: Any) -> Any:
    """Where ``like``'s leaf lives: its sharding, else the default device."""
    sharding = getattr(x, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])


__all__ = ["train_step", "save_checkpoint", "restore_checkpoint"]
