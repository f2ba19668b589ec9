"""Gradients in a block: ``with loss.backward():`` reads and edits ``.grad`` of site values.

A program with ``backward_target`` equations is cut in two before scheduling
(:func:`split_backward`). The forward part is an ordinary program: it is
scheduled and woven into the forward as usual, and also hands out the losses and
the forward values the backward part uses. The backward part runs after the
forward, from ``jax.vjp`` of the whole woven forward with respect to zero
*probes* added to the site leaves whose gradient the block reads:

- the cotangent of a probe is the gradient of the loss with respect to that
  site value (``h.grad``), after the edits of sites downstream of it;
- a gradient edit (``h.grad = f(h.grad)``) is a ``jax.custom_vjp`` identity
  at the site whose backward rule applies ``f`` to the incoming cotangent, so
  everything upstream of the site receives the edited gradient;
- what the block computes from gradients (saves) is evaluated last.

Each backward target is one pull-back of the same ``jax.vjp``. Everything stays
JAX: the block under ``jax.jit`` compiles forward and backward into one program.

Example::

    >>> with lm.trace(prompt):
    ...     h = lm.model.layers[10].output[0]
    ...     loss = -jax.nn.log_softmax(lm.lm_head.output[0, -1])[target]
    ...     with loss.backward():
    ...         g = h.grad.save()
    ...         h.grad = h.grad * 0      # nothing flows upstream of layer 10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, DebugInfo, Jaxpr, Var

from ..errors import JnnsightError, SiteError, at_line
from .discover import SiteKey
from .program import (
    InterventionProgram,
    backward_target_p,
    grad_read_p,
    grad_write_p,
    site_read_p,
    site_skip_p,
    site_write_p,
)
from .schedule import PRE, Schedule, atom_value, program_site_name

_GRAD = (grad_read_p, grad_write_p, backward_target_p)


@dataclass(frozen=True)
class GradientEdit:
    """``h.grad = f(h.grad)`` at one site leaf: ``f`` as a jaxpr of the cotangent and residuals."""

    cotangent: Var
    residuals: tuple[Var, ...]
    jaxpr: Jaxpr


@dataclass(frozen=True)
class Backward:
    """The part of a program that needs gradients.

    Attributes:
      losses: the forward variable of each backward target's scalar.
      probes: the abstract value of each ``(site, leaf)`` whose gradient is read or edited.
      reads: the variable of each ``(site, leaf, target)`` gradient read.
      edits: per ``(site, leaf)``, its gradient edit.
      rest: what the block computes from gradients, over forward variables and reads.
      outvars: the program's saves.
      keys: the site key of each site order in ``probes``.
      lines: where the block read each site in ``probes`` (for errors).
      names: how the user addresses each site in ``probes`` (for errors).
    """

    losses: tuple[Var, ...]
    probes: dict[tuple[int, int], Any]
    reads: dict[tuple[int, int, int], Var]
    edits: dict[tuple[int, int], GradientEdit]
    rest: Jaxpr
    outvars: tuple[Any, ...]
    keys: dict[int, SiteKey]
    lines: dict[int, Any]
    names: dict[int, str]


def _jaxpr(inputs: list[Var], outputs: list[Any], eqns: list[Any], name: str) -> Jaxpr:
    effects = frozenset().union(*(e.effects for e in eqns)) if eqns else frozenset()
    info = DebugInfo("jnnsight gradients", name, None, None).with_unknown_names()
    return Jaxpr([], inputs, outputs, eqns, effects, debug_info=info)


def _closure(eqns: list[Any], wanted: list[Any]) -> list[Any]:
    """The equations of ``eqns`` that ``wanted`` variables need, in order."""
    need = {v for v in wanted if isinstance(v, Var)}
    kept = []
    for eqn in reversed(eqns):
        if any(v in need for v in eqn.outvars):
            kept.append(eqn)
            need.update(v for v in eqn.invars if isinstance(v, Var))
    return kept[::-1]


def _free(eqns: list[Any], extra: list[Any] = ()) -> list[Var]:
    """Variables ``eqns`` (and ``extra`` atoms) use that they do not define, in first-use order."""
    defined = {v for e in eqns for v in e.outvars}
    free: dict[Var, None] = {}
    for atom in [v for e in eqns for v in e.invars] + list(extra):
        if isinstance(atom, Var) and atom not in defined:
            free[atom] = None
    return list(free)


def split_backward(program: InterventionProgram) -> tuple[InterventionProgram, Backward | None]:
    """The forward program and the backward part of ``program`` (None without ``backward()``)."""
    jaxpr = program.jaxpr.jaxpr
    if not any(e.primitive is backward_target_p for e in jaxpr.eqns):
        return program, None
    needs_grad: set[Var] = set()
    forward, backward, losses = [], [], {}
    for eqn in jaxpr.eqns:
        if eqn.primitive is backward_target_p:
            losses[eqn.params["target"]] = eqn.invars[0]
        elif eqn.primitive in _GRAD or any(v in needs_grad for v in eqn.invars if isinstance(v, Var)):
            needs_grad.update(eqn.outvars)
            backward.append(eqn)
        else:
            forward.append(eqn)

    for target, loss in losses.items():
        if isinstance(loss, Var) and loss in needs_grad:
            raise JnnsightError(at_line(
                program.target_lines.get(target),
                f"`backward()` target #{target} is computed from a `.grad` (a gradient "
                "penalty: torch's `create_graph=True`), which a block cannot differentiate: "
                "its gradients exist only after the forward's backward pass. Put the trace in "
                "a function and take `jax.grad` of it, which differentiates gradients too."
            ))
        if not any(e.primitive is site_read_p for e in _closure(forward, [loss])):
            raise JnnsightError(at_line(
                program.target_lines.get(target),
                f"`backward()` target #{target} depends on no module value (it is a constant, "
                "or uses only outside arrays or parameters), so every `.grad` of it is zero. "
                "Compute the loss from `envoy.output` or `.input` values; for gradients with "
                "respect to parameters use `jax.grad` over `model.bind(params)`."
            ))
    for eqn in backward:
        if eqn.primitive in (site_write_p, site_skip_p):
            raise JnnsightError(
                f"{program.write_lines.get(eqn.params['site'])}\nthis edit of the forward "
                "uses a gradient, which exists only after the forward has run. Save the "
                "gradient and edit a second trace with it."
            )
    _check_not_skipped(program, [e for e in backward if e.primitive in (grad_read_p, grad_write_p)])
    reads = {(e.params["site"], e.params["leaf"], e.params["target"]): e.outvars[0]
             for e in backward if e.primitive is grad_read_p}
    probes = {(e.params["site"], e.params["leaf"]): e.params["aval"]
              for e in backward if e.primitive is grad_read_p}
    writes = [e for e in backward if e.primitive is grad_write_p]
    plain = [e for e in backward if e.primitive not in _GRAD]
    if writes and len(losses) > 1:
        raise JnnsightError(at_line(
            next(iter(program.grad_write_lines.values()), None),
            "a block that edits gradients can have one `backward()` target; this one has "
            f"{len(losses)}. Differentiate their sum, or use one trace per target."
        ))
    edits = {}
    for write in writes:
        site, leaf, target = (write.params[k] for k in ("site", "leaf", "target"))
        eqns = _closure(plain, write.invars)
        own = reads[(site, leaf, target)]
        inputs = _free(eqns, write.invars)
        others = [v for v in inputs if v in needs_grad and v is not own]
        if others:
            raise JnnsightError(at_line(
                program.grad_write_lines.get((site, leaf, target)),
                "a gradient edit at a site can use that site's own gradient, module values "
                "and outside arrays, not the gradient of another site."
            ))
        residuals = tuple(v for v in inputs if v is not own)
        edits[(site, leaf)] = GradientEdit(own, residuals, _jaxpr([own, *residuals], list(write.invars), eqns, f"edit {site}"))

    saved_plain = _closure(plain, [v for v in jaxpr.outvars if v in needs_grad])
    rest_inputs = _free(saved_plain, [v for v in jaxpr.outvars if v in needs_grad])
    rest = _jaxpr(rest_inputs, [v for v in jaxpr.outvars if isinstance(v, Var) and v in needs_grad],
                  saved_plain, "saves")

    residual_vars = [v for e in edits.values() for v in e.residuals]
    keep = [v for v in jaxpr.outvars if isinstance(v, Var) and v not in needs_grad]
    keep += [losses[t] for t in sorted(losses)] + residual_vars
    keep += [v for v in rest_inputs if v not in needs_grad]
    keep = [v for v in dict.fromkeys(keep) if v not in set(jaxpr.constvars)]
    forward_jaxpr = Jaxpr(jaxpr.constvars, [], keep, forward,
                          frozenset().union(*(e.effects for e in forward)) if forward else frozenset(),
                          debug_info=DebugInfo("jnnsight gradients", "forward", None, None
                                               ).with_unknown_names())
    forward_program = InterventionProgram(
        ClosedJaxpr(forward_jaxpr, program.jaxpr.consts), program.table,
        program.read_lines, program.write_lines, program.stop, program.grad_write_lines,
        program.target_lines,
    )
    keys = {site: program.table.sites[site].key for site, _ in probes}
    lines = {site: program.read_lines.get(site) for site in keys}
    names = {site: program_site_name(program, site) for site in keys}
    return forward_program, Backward(
        tuple(losses[t] for t in sorted(losses)), probes, reads, edits, rest, tuple(jaxpr.outvars),
        keys, lines, names,
    )


def _check_not_skipped(program: InterventionProgram, grads: list[Any]) -> None:
    """A gradient inside a skipped module would silently be zero: refuse it."""
    table = program.table
    for eqn in program.jaxpr.jaxpr.eqns:
        if eqn.primitive is not site_skip_p:
            continue
        path, call, _ = table.sites[eqn.params["site"]].key
        end = table.get((path, call, "output")).order
        inside = [e for e in grads if eqn.params["site"] < e.params["site"] < end]
        if inside:
            name = program_site_name(program, eqn.params["site"]).rsplit(".", 1)[0]
            raise SiteError(
                f"{program.write_lines.get(eqn.params['site'])}\n`{name}` is skipped, so "
                "nothing inside it runs, yet the block takes a gradient there. Take `.grad` "
                "of the skipped module's own input or output instead."
            )


def check_edits(plan: Schedule, backward: Backward, program: InterventionProgram) -> None:
    """A gradient edit runs at its site: the forward values it uses must exist there."""
    stage_of: dict[Var, int] = {v: PRE for v in plan.consts}
    stage_of.update((v, PRE) for _, v in plan.params)
    if plan.pre.jaxpr is not None:
        stage_of.update((v, PRE) for v in plan.pre.jaxpr.outvars)
    for stage in plan.stages.values():
        stage_of.update((v, stage.order) for _, v in stage.reads)
        if stage.jaxpr is not None:
            stage_of.update((v, stage.order) for v in stage.jaxpr.outvars)
    for (site, leaf), edit in backward.edits.items():
        late = [stage_of.get(v, PRE) for v in edit.residuals if stage_of.get(v, PRE) > site]
        if late:
            line = next((at for (s, j, _), at in program.grad_write_lines.items()
                         if (s, j) == (site, leaf)), None)
            raise JnnsightError(at_line(line, (
                f"this gradient edit of {program_site_name(program, site)} uses "
                f"{program_site_name(program, max(late))}, which the forward computes "
                "later: in the backward pass the edit happens when the gradient reaches its "
                "own site, with only what the forward had computed by then. Save the later "
                "value in a first trace and use that array in the edit.")))


def _edit_hook(edit: GradientEdit, residuals: list[Any]) -> Callable[[jax.Array], jax.Array]:
    """An identity whose backward rule replaces the cotangent by the edit's value."""

    @jax.custom_vjp
    def hook(x, res):
        return x

    def forward(x, res):
        return x, res

    def backward(res, cotangent):
        env = dict(zip(edit.residuals, res))
        env[edit.cotangent] = cotangent
        (new,) = jax.core.eval_jaxpr(edit.jaxpr, [], *[atom_value(env, v) for v in edit.jaxpr.invars])
        zeros = [np.zeros(np.shape(r), jax.dtypes.float0)
                 if not jnp.issubdtype(jnp.result_type(r), jnp.inexact) else jnp.zeros_like(r)
                 for r in res]
        return new, zeros

    hook.defvjp(forward, backward)
    return lambda x: hook(x, residuals)


def _primal(value: Any) -> Any:
    """The jitted forward's tracer under ``jax.vjp``'s."""
    while hasattr(value, "primal"):
        value = value.primal
    return value


def _sub_jaxprs(params: dict) -> list[Jaxpr]:
    """The jaxprs an equation calls (``jit``, ``checkpoint``, ``custom_jvp``, ``cond``'s branches)."""
    found = []
    for param in params.values():
        for p in param if isinstance(param, (tuple, list)) else (param,):
            if isinstance(p, ClosedJaxpr):
                found.append(p.jaxpr)
            elif isinstance(p, Jaxpr):
                found.append(p)
    return found


def _fed_outputs(eqn: Any, index: int) -> set[int]:
    """The outputs of a call equation that its output ``index`` is computed into inside
    the call: ``out, probs = jax.checkpoint(attend)(q, k, v)`` computes ``out`` from ``probs``."""
    fed: set[int] = set()
    for jaxpr in _sub_jaxprs(eqn.params):
        if len(jaxpr.outvars) == len(eqn.outvars) and isinstance(jaxpr.outvars[index], Var):
            reached = _reached(jaxpr.eqns, jaxpr.outvars[index])
            fed.update(k for k, v in enumerate(jaxpr.outvars)
                       if k != index and isinstance(v, Var) and v in reached)
    return fed


def _reached(eqns: list[Any], start: Var) -> set[Var]:
    """The variables of ``eqns`` computed from ``start``, inside the calls that compute it too."""
    reached = {start}
    for eqn in eqns:
        if start in eqn.outvars:
            reached.update(eqn.outvars[k] for k in _fed_outputs(eqn, eqn.outvars.index(start)))
        elif any(isinstance(v, Var) and v in reached for v in eqn.invars):
            reached.update(eqn.outvars)
    return reached


def _feeds_other_leaves(value: Any, others: list[Any]) -> bool:
    """Whether the traced forward computed one of ``others`` (the other leaves of the
    same module output) from ``value``: attention weights, which the module multiplies
    with the values into its output, in its own code or inside a ``jax.jit`` or
    ``jax.checkpoint`` it calls. Follows JAX's tracing state (the jitted trace's
    equations so far); False where it cannot be inspected."""
    value = _primal(value)
    frame = getattr(getattr(value, "_trace", None), "frame", None)
    equations = getattr(frame, "tracing_eqns", None)
    targets = {id(getattr(_primal(o), "val", None)) for o in others} - {id(None)}
    if equations is None or not hasattr(value, "val") or not targets:
        return False
    reached = {id(value.val)}
    for eqn in equations:
        eqn = eqn() if callable(eqn) else eqn  # (a weak reference in some JAX versions)
        if eqn is None:
            continue
        outputs = [id(v) for v in eqn.outvars]
        if id(value.val) in outputs:  # computed by a call: what it computes from the value inside
            reached.update(outputs[k] for k in _fed_outputs(eqn, outputs.index(id(value.val))))
        elif any(id(getattr(v, "val", v)) in reached for v in eqn.invars):
            reached.update(outputs)
    return bool(reached & targets)


def _used_inside_error(backward: Backward, site: int, leaf: int) -> JnnsightError:
    name = backward.names[site]
    return JnnsightError(at_line(backward.lines.get(site), (
        f"`.grad` of {name} (leaf {leaf}) would miss part of the gradient: the module "
        "computed its other outputs from this value before returning it (attention "
        "weights feed the attention output), and a gradient taken where the module "
        "returns it counts only the uses after that, where PyTorch counts every use. Take "
        "`.grad` of the output computed from it (`.output[0]`), or of a submodule's output "
        "(GPT-2's attention weights, before the product: `attn.attn_dropout.output`).")))


def with_gradients(
    apply: Callable[[dict, dict], Any],
    plan: Schedule,
    backward: Backward,
    outside: dict,
) -> tuple[Any, list[Any]]:
    """Run ``apply(env, hooks)`` (the woven forward) under ``jax.vjp``; the output and the saves.

    ``apply`` fills ``env`` with the forward program's values and calls
    ``hooks[site key](leaves, values)`` on a site's leaves before the block's
    stage there reads them (see :func:`~jnnsight.tracing.execute.woven_apply`):
    each probed leaf gets its gradient edit and its probe on the value the model
    computes there, so the gradient counts every use of it, writes included.
    ``outside`` holds the outside arrays and parameters.
    """
    by_site: dict[int, list[int]] = {}
    for site, leaf in backward.probes:
        by_site.setdefault(site, []).append(leaf)
    forward_vars = [v for v in plan.outvars if isinstance(v, Var)]

    def forward(probes: dict) -> tuple[list[Any], tuple[Any, list[Any]]]:
        env: dict = {}

        def hook_for(site: int) -> Callable[..., list[Any]]:
            def hook(leaves: list[Any], values: Callable[[list[Any]], dict]) -> list[Any]:
                model_leaves, leaves = leaves, list(leaves)
                done: set[int] = set()
                for leaf in by_site[site]:
                    if leaf in done:
                        continue
                    x = model_leaves[leaf]
                    # leaves that are this same array (`return h, (h0, h)`) are one value, as
                    # one torch tensor is: each gets the edits and the probes of them all
                    same = [k for k, y in enumerate(model_leaves) if y is x]
                    others = [y for y in model_leaves if y is not x]
                    probed = [k for k in same if (site, k) in backward.probes]
                    if backward.keys[site][2] == "output" and _feeds_other_leaves(x, others):
                        raise _used_inside_error(backward, site, probed[0])
                    for k in probed:
                        edit = backward.edits.get((site, k))
                        if edit is not None:
                            known = env if all(v in env for v in edit.residuals) \
                                else values(list(edit.residuals))
                            x = _edit_hook(edit, [atom_value(known, v) for v in edit.residuals])(x)
                    x = x + sum(probes[f"{site}:{k}"] for k in probed)
                    for k in same:
                        leaves[k] = x
                    done.update(same)
                return leaves
            return hook

        out = apply(env, {backward.keys[site]: hook_for(site) for site in by_site})
        losses = [env[v] for v in backward.losses]
        return losses, (out, [env[v] for v in forward_vars])

    probes = {f"{site}:{leaf}": jnp.zeros(aval.shape, aval.dtype)
              for (site, leaf), aval in backward.probes.items()}
    losses, pull_back, (out, values) = jax.vjp(forward, probes, has_aux=True)
    env = dict(outside)
    env.update(zip(forward_vars, values))
    for target in range(len(losses)):
        seeds = [jnp.ones_like(l) if i == target else jnp.zeros_like(l) for i, l in enumerate(losses)]
        (cotangents,) = pull_back(seeds)
        for (site, leaf, t), var in backward.reads.items():
            if t == target:
                env[var] = cotangents[f"{site}:{leaf}"]
    rest = backward.rest
    if rest.eqns or rest.outvars:
        values = jax.core.eval_jaxpr(rest, [], *[atom_value(env, v) for v in rest.invars])
        env.update(zip(rest.outvars, values))
    return out, [atom_value(env, v) for v in backward.outvars]


__all__ = ["Backward", "GradientEdit", "split_backward", "check_edits", "with_gradients"]
