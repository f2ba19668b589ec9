"""Step 6, execute: one jitted function runs the forward and the scheduled program.

Inside the traced function (an interceptor around an already-compiled function
would be silently ignored), ``flax.linen.intercept_methods`` numbers module
calls; at each site the schedule touches, the interceptor binds the site's
leaves, evaluates that stage's equations with ``jax.core.eval_jaxpr``, applies
the site's write, and at the end the saves come out as outputs.

Compiled programs are cached by the program's key (its site table and
fingerprint) and the static parts of the inputs; ``jax.jit`` keys the rest by
argument shapes. Inputs, parameters and outside arrays are arguments, so a
block run again with new values of the same shapes does not compile again.

Example::

    >>> # output, saves = executor(module, schedule, program_key, variables,
    >>> #                          args, kwargs, consts)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from ..errors import JnnsightError
from .discover import SiteKey, applied_method, is_array, site_interceptor, site_name, static_key
from .lru import LruCache
from .gradients import Backward, with_gradients
from .schedule import Schedule, Stage, atom_value, pruned


Hook = Callable[[list[Any], Callable[[list[Any]], dict]], list[Any]]


class _StopForward(BaseException):
    """Raised by the interceptor after the last site a stopped program needs."""


def _mismatch(what: str) -> JnnsightError:
    return JnnsightError(
        f"{what}: this model's sites depend on its input sizes in a way jnnsight's "
        "discovery did not see. If its class sets `jnnsight_symbolic_sizes = True`, "
        "remove that; otherwise please report it, with the model."
    )


def run_stage(stage: Stage, env: dict, leaves: list[Any] | None) -> None:
    """Bind the site's leaves the stage reads, then evaluate its equations into ``env``."""
    for j, var in stage.reads:
        if np.shape(leaves[j]) != var.aval.shape:
            raise _mismatch(f"site #{stage.order} holds shape {list(np.shape(leaves[j]))} in "
                            f"this forward, and discovery found {list(var.aval.shape)}")
        env[var] = leaves[j]
    if stage.jaxpr is not None:
        args = [atom_value(env, v) for v in stage.jaxpr.invars]
        env.update(zip(stage.jaxpr.outvars, jax.core.eval_jaxpr(stage.jaxpr, [], *args)))


def _replace_arrays(leaves: list[Any], atoms: tuple[Any, ...], env: dict) -> list[Any]:
    """``leaves`` with its array slots (arrays, or abstract arrays) filled from ``atoms``."""
    new = iter([atom_value(env, a) for a in atoms])
    out = [next(new) if is_array(x) or isinstance(x, jax.ShapeDtypeStruct) else x for x in leaves]
    for old, value in zip(leaves, out):
        if value is not old and np.shape(value) != np.shape(old):
            raise _mismatch(f"a write of shape {list(np.shape(value))} replaces a value of "
                            f"shape {list(np.shape(old))}")
    return out


def woven_apply(module: nn.Module, stages: dict[SiteKey, Stage], env: dict,
                stop_after: int | None = None,
                hooks: dict[SiteKey, Hook] | None = None,
                ) -> Callable[..., Any]:
    """``module.apply`` with each stage run when the forward reaches its site.

    Stages read and extend ``env``, the values of the program's variables.
    ``hooks[key](leaves, values)`` gives the site's leaves with some replaced
    (gradient probes), before the stage reads them, so the block's own uses of
    the model's value count. ``values(wanted)`` is the environment with the
    wanted variables of this site's stage computed. Call it inside the traced
    function.
    """
    hooks = hooks or {}

    def apply(variables: Any, *args: Any, **kwargs: Any) -> Any:
        skipped: dict[SiteKey, Stage] = {}
        reached: set[SiteKey] = set()

        def visit(key: SiteKey, value: Any) -> Any:
            stage, hook = stages.get(key), hooks.get(key)
            if stage is None and hook is None:
                return value
            reached.add(key)
            leaves, treedef = jax.tree_util.tree_flatten(value)
            if hook is not None:  # the block's own reads see a probed value
                raw = leaves

                def at_site(wanted: list[Any]) -> dict:
                    """The environment with the ``wanted`` values of this site's stage,
                    computed from unprobed leaves (only the equations they need)."""
                    peek = dict(env)
                    if stage is not None:
                        part = pruned(stage, set(wanted)) or dataclasses.replace(stage, jaxpr=None)
                        run_stage(part, peek, raw)
                    return peek

                leaves = hook(leaves, at_site)
            if stage is not None:
                run_stage(stage, env, leaves)
                if stage.skip is not None:
                    skipped[key] = stage
                if stage.write is not None:
                    leaves = _replace_arrays(leaves, stage.write, env)
            value = jax.tree_util.tree_unflatten(treedef, leaves)
            if stop_after is not None and stage is not None and stage.order == stop_after:
                raise _StopForward
            return value

        def on_input(key, module, a, k):
            return visit(key, (a, k))

        def on_output(key, module, out):
            return visit(key, out)

        counts: dict[tuple[str, ...], int] = {}

        def call_module(key: SiteKey, call: Callable[[], Any]) -> Any:
            stage = skipped.pop(key, None)
            if stage is None:
                return call()
            for path in stage.skipped_calls:  # numbered as if they ran, as in discovery
                counts[path] = counts.get(path, 0) + 1
            site = stage.skip_output
            return site.unflatten(_replace_arrays(list(site.leaves), stage.skip, env))

        with nn.intercept_methods(site_interceptor(on_input, on_output, call_module, counts,
                                                   applied_method(kwargs))):
            try:
                out = module.apply(variables, *args, **kwargs)
            except _StopForward:
                out = None
        missed = [key for key in stages if key not in reached]
        if missed:
            raise _mismatch(f"the forward never reached {site_name(missed[0])}, a site "
                            "discovery found")
        return out

    return apply


def bind_inputs(schedule: Schedule, variables: Any, consts: list[Any],
                params: tuple[tuple[int, Any], ...] | None = None) -> dict:
    """A fresh environment: the program's outside arrays and the parameters it reads."""
    env: dict = dict(zip(schedule.consts, consts))
    leaves = jax.tree_util.tree_leaves(variables)
    for j, var in schedule.params if params is None else params:
        env[var] = leaves[j]
    return env


def _forward(module: nn.Module, schedule: Schedule, stop_after: int | None) -> Callable[..., Any]:
    """The forward with the program woven in: ``(variables, args, kwargs, consts) -> (out, saves)``."""

    def run(variables: Any, args: tuple, kwargs: dict, consts: list[Any]) -> tuple[Any, list[Any]]:
        env = bind_inputs(schedule, variables, consts)
        run_stage(schedule.pre, env, None)
        out = woven_apply(module, schedule.stages, env, stop_after)(variables, *args, **kwargs)
        return out, [atom_value(env, a) for a in schedule.outvars]

    return run


def _forward_and_backward(module: nn.Module, schedule: Schedule, backward: Backward,
                          stop_after: int | None) -> Callable[..., Any]:
    """The forward with the program woven in, under ``jax.vjp`` for the block's gradients."""

    def run(variables: Any, args: tuple, kwargs: dict, consts: list[Any]) -> tuple[Any, list[Any]]:
        outside = bind_inputs(schedule, variables, consts)

        def apply(env: dict, hooks: dict) -> Any:
            env.update(outside)
            run_stage(schedule.pre, env, None)
            return woven_apply(module, schedule.stages, env, stop_after, hooks)(variables, *args, **kwargs)

        return with_gradients(apply, schedule, backward, outside)

    return run


class Executor:
    """A model's compiled-program cache: one jitted forward per program and input structure."""

    def __init__(self, max_entries: int = 256):
        self._entries = LruCache(max_entries)

    def __call__(
        self,
        module: nn.Module,
        schedule: Schedule,
        program_key: Any,
        variables: Any,
        args: tuple,
        kwargs: dict,
        consts: list[Any],
        backward: Backward | None = None,
        keep_output: bool = True,
    ) -> tuple[Any, list[Any]]:
        """Run the forward with ``schedule`` woven in; compile only on a new key.

        With ``keep_output=False`` the output is ``None`` and the program returns
        only the saves, so XLA drops whatever only the output needed (a language
        model's logits, when the block reads hidden states).
        """
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        arrays = [x for x in leaves if is_array(x)]
        static = tuple(None if is_array(x) else x for x in leaves)
        key = (program_key, treedef, tuple(static_key(x) for x in static), keep_output)
        jitted = self._entries.get(key)
        if jitted is None:
            jitted = self._entries.put(
                key, self._compile(module, schedule, treedef, static, backward, keep_output))
        return jitted(variables, arrays, consts)

    @staticmethod
    def _compile(module, schedule, treedef, static, backward, keep_output) -> Callable[..., Any]:
        stop_after = schedule.last if schedule.stop else None
        if backward is None:
            run = _forward(module, schedule, stop_after)
        else:
            run = _forward_and_backward(module, schedule, backward, stop_after)

        def forward(variables, arrays, consts):
            it = iter(arrays)
            leaves = [next(it) if x is None else x for x in static]
            args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
            out, saves = run(variables, args, kwargs, consts)
            return (out if keep_output else None), saves

        return jax.jit(forward)
