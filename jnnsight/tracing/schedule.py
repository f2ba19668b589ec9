"""Step 5, schedule: each equation runs at the earliest site where its inputs exist.

Sites are numbered in forward order. A site read has the stage of its site;
parameters and outside arrays have stage -1; any other equation has the largest
stage among its inputs. The equations of one stage form one sub-jaxpr, evaluated
when the forward reaches that site; values stay in an environment for later
stages. A write at site ``k`` whose value has a stage above ``k`` would need the
future: that is a :class:`CausalityError`, raised before anything runs.

Example::

    >>> # block_1.output is site 5, block_3.output is site 11
    >>> #   model.block_3.output = model.block_1.output * 2   # fine: stage 5 <= 11
    >>> #   model.block_1.output = model.block_3.output * 2   # CausalityError
"""

from __future__ import annotations

import dataclasses
import linecache
import re
from dataclasses import dataclass
from typing import Any

from jax._src import source_info_util
from jax.extend.core import DebugInfo, Jaxpr, Literal, Var

from ..errors import CausalityError, SiteError, UserLine, is_library_file, warn_at
from .program import (
    InterventionProgram,
    backward_target_p,
    grad_write_p,
    param_read_p,
    site_read_p,
    site_skip_p,
    site_write_p,
)
from .discover import Site, SiteKey

PRE = -1  # the stage of everything that needs no site


@dataclass(frozen=True)
class Stage:
    """What happens at one site: bind its leaves, run equations, replace its value.

    Attributes:
      reads: ``(leaf index, var)`` pairs bound from the site's value.
      jaxpr: this stage's equations over variables of earlier stages, or None.
      write: the atoms of the site's new array leaves, or None.
      skip: for a module's input site, the atoms of the output that replaces
        the module's call, or None; ``skip_output`` is that output's site.
      skipped_calls: the module calls the skipped call would have made (its
        children's, and modules it shares with its parent), so later calls of
        those modules keep their numbers.
    """

    order: int
    reads: tuple[tuple[int, Var], ...]
    jaxpr: Jaxpr | None
    write: tuple[Any, ...] | None
    skip: tuple[Any, ...] | None = None
    skip_output: Site | None = None
    skipped_calls: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Schedule:
    """An intervention program cut into stages, one per site it touches.

    Attributes:
      consts: the program's constant vars (outside arrays), bound first.
      params: ``(leaf index, var)`` of the parameters the program reads.
      pre: the stage that runs before the forward.
      stages: per site key, the stage run when the forward reaches it.
      outvars: the saved atoms, read from the environment at the end.
      last: the order of the last site the program needs.
      stop: stop the forward after ``last``.
    """

    consts: tuple[Var, ...]
    params: tuple[tuple[int, Var], ...]
    pre: Stage
    stages: dict[SiteKey, Stage]
    outvars: tuple[Any, ...]
    last: int
    stop: bool


def program_site_name(program: InterventionProgram, order: int) -> str:
    """How the user addresses the site numbered ``order`` in ``program``'s table."""
    return program.table.name(program.table.sites[order].key)


def _causality_error(program: InterventionProgram, at: int, needs: int, skip: bool) -> CausalityError:
    what = "skip of" if skip else "write to"
    target = program_site_name(program, at)
    source = program_site_name(program, needs)
    if skip:
        target = target.rsplit(".", 1)[0]
    write_line = program.write_lines.get(at)
    read_line = program.read_lines.get(needs)
    locate = getattr(program.table, "locate", None)  # a generation's table: sites by step
    steps = (locate(at)[0], locate(needs)[0]) if locate is not None else None
    return CausalityError(
        f"{write_line}\nThe {what} `{target}` depends on `{source}`"
        f" (read at {read_line}), which the forward pass computes later: it is site "
        f"#{needs} in forward order and the {what.split()[0]} happens at site #{at}. "
        "A write can only use values of sites that run before it: compute the value "
        "from earlier sites, write to a later site, or run a second trace with the "
        "saved value."
        + (f" In generation that value is step {steps[1]}'s and the {what.split()[0]} is at "
           f"step {steps[0]}: a name bound in a `tracer.all()` or `tracer.iter[...]` body, "
           "which runs for every step before generation starts, holds the last step's "
           "value after it. To use each step's value at its own step, read and write in "
           "one body (both rows in one invoke, or one loop), or append each step's value "
           "to a list and index it with a step counter."
           if steps is not None and steps[1] > steps[0] else "")
    )


def _live_equations(jaxpr: Jaxpr, sinks: tuple[Any, ...] = (site_write_p, site_skip_p)) -> list[Any]:
    """The equations whose results are needed: by the outputs, by an equation of a
    ``sinks`` primitive, or for their effects (dead code removed)."""
    needed = {v for v in jaxpr.outvars if isinstance(v, Var)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        keep = (
            eqn.primitive in sinks
            or bool(eqn.effects)
            or any(v in needed for v in eqn.outvars)
        )
        if keep:
            live.append(eqn)
            needed.update(v for v in eqn.invars if isinstance(v, Var))
    live.reverse()
    return live


# what `x.at[...].set/add/mul/min/max(v)` and `lax.dynamic_update_slice` lower to
_UPDATES = frozenset({"scatter", "scatter-add", "scatter_add", "scatter-mul", "scatter_mul",
                      "scatter-min", "scatter_min", "scatter-max", "scatter_max",
                      "dynamic_update_slice"})


_AUGMENTED = re.compile(r"^\s*([A-Za-z_]\w*)\s*(\+|-|\*|/|//|%|@|\*\*|&|\||\^|<<|>>)=")


def warn_unused_updates(program: InterventionProgram) -> None:
    """Warn at each line of the block whose array update is never used.

    ``h = h.at[:, -1].set(0)`` or ``h += 1`` rebinds a name and changes nothing in
    the model (a write does: ``envoy.output = ...``), where a torch user's
    ``h[:, -1] = 0`` or ``h += 1`` edited the model's tensor in place. A body's only
    reason to compute an update is to use it, so an unused one is that mistake.

    Example::

        >>> # with model.trace(x):
        >>> #     h = model.block_1.output
        >>> #     h = h.at[:, -1].set(0)      # UserWarning here: the model never sees it
        >>> #     h += 1                      # and here
    """
    jaxpr = program.jaxpr.jaxpr
    live = {id(e) for e in _live_equations(
        jaxpr, (site_write_p, site_skip_p, grad_write_p, backward_target_p))}
    unused: dict[UserLine, str | None] = {}  # the line, and its `h += ...` if it is one
    used = set()
    for eqn in jaxpr.eqns:
        frame = next(iter(source_info_util.user_frames(eqn.source_info.traceback)), None)
        if frame is None or is_library_file(frame.file_name):  # not the user's own
            continue
        line = UserLine(frame.file_name, frame.start_line)
        # a body's own line (compiled as a module), not the user's module or helper code
        augmented = frame.function_name == "<module>" and _AUGMENTED.match(
            linecache.getline(frame.file_name, frame.start_line))
        if eqn.primitive.name not in _UPDATES and not augmented:
            continue
        if id(eqn) in live:
            used.add(line)
        else:
            unused.setdefault(line, augmented.group(0).strip() if augmented else None)
    # A line run several times (a loop over layers or steps) warns once, and not when
    # some run of it is used: the last run of an update carried to the next iteration.
    for line, augmented in unused.items():
        if line in used:
            continue
        if augmented is None:
            warn_at(line, (
                "this update's result is never written to the model or saved, so the "
                "forward does not see it: JAX arrays do not change in place, and rebinding "
                "a name does not write its site. Write it back: "
                "`envoy.output = envoy.output.at[:, -1].set(v)`."))
        else:
            name = _AUGMENTED.match(augmented).group(1)
            warn_at(line, (
                f"this update's result is never written to the model or saved, so the "
                f"forward does not see it: `{augmented} ...` makes a new array and rebinds "
                f"`{name}` (JAX arrays do not change in place, as torch tensors do). Write it "
                f"to the site it came from: `envoy.output = {name}`, or `envoy.output "
                f"{augmented[len(name):].strip()} ...` on the envoy itself."))


def schedule(program: InterventionProgram) -> Schedule:
    """Cut ``program`` into stages; raise :class:`CausalityError` on a write from the future."""
    jaxpr = program.jaxpr.jaxpr
    table = program.table
    stage_of: dict[Var, int] = {v: PRE for v in jaxpr.constvars}
    reads: dict[int, list[tuple[int, Var]]] = {}
    eqns: dict[int, list[Any]] = {}
    writes: dict[int, tuple[Any, ...]] = {}
    skips: dict[int, tuple[Any, ...]] = {}
    params: list[tuple[int, Var]] = []

    def stage(atoms) -> int:
        return max((stage_of[a] for a in atoms if isinstance(a, Var)), default=PRE)

    for eqn in _live_equations(jaxpr):
        prim = eqn.primitive
        if prim is site_read_p:
            order = eqn.params["site"]
            stage_of[eqn.outvars[0]] = order
            reads.setdefault(order, []).append((eqn.params["leaf"], eqn.outvars[0]))
        elif prim is param_read_p:
            stage_of[eqn.outvars[0]] = PRE
            params.append((eqn.params["leaf"], eqn.outvars[0]))
        elif prim in (site_write_p, site_skip_p):
            order = eqn.params["site"]
            needs = stage(eqn.invars)
            if needs > order:
                raise _causality_error(program, order, needs, prim is site_skip_p)
            (writes if prim is site_write_p else skips)[order] = tuple(eqn.invars)
        else:
            s = stage(eqn.invars)
            for v in eqn.outvars:
                stage_of[v] = s
            eqns.setdefault(s, []).append(eqn)

    # Which vars each stage must hand on: those used by other stages or at the end.
    used_later: set[Var] = {v for v in jaxpr.outvars if isinstance(v, Var)}
    for atoms in (*writes.values(), *skips.values()):
        used_later.update(v for v in atoms if isinstance(v, Var))
    for s, group in eqns.items():
        for eqn in group:
            used_later.update(v for v in eqn.invars if isinstance(v, Var) and stage_of[v] != s)

    def sub_jaxpr(s: int) -> Jaxpr | None:
        group = eqns.get(s)
        if not group:
            return None
        defined = {v for e in group for v in e.outvars}
        inputs: list[Var] = []
        for e in group:
            for v in e.invars:
                if isinstance(v, Var) and v not in defined and v not in inputs:
                    inputs.append(v)
        outputs = [v for e in group for v in e.outvars if v in used_later]
        effects = frozenset().union(*(e.effects for e in group))
        info = DebugInfo("jnnsight stage", f"site {s}", None, None).with_unknown_names()
        return Jaxpr([], inputs, outputs, group, effects, debug_info=info)

    orders = sorted((set(reads) | set(eqns) | set(writes) | set(skips)) - {PRE})
    def make_stage(order: int) -> Stage:
        path, call, _ = table.sites[order].key
        skip = skips.get(order)
        output = table.get((path, call, "output")) if skip is not None else None
        return Stage(
            order,
            tuple(reads.get(order, ())),
            sub_jaxpr(order),
            writes.get(order),
            skip,
            output,
            () if output is None else tuple(  # (a step table's sites take no slices)
                table.sites[o].key[0] for o in range(order + 1, output.order)
                if table.sites[o].key[2] == "input"),
        )

    stages = {table.sites[o].key: make_stage(o) for o in orders}
    for order in skips:
        inside = [o for o in orders if order < o < stages[table.sites[order].key].skip_output.order]
        if inside:
            module = program_site_name(program, order).rsplit(".", 1)[0]
            raise SiteError(
                f"{program.write_lines.get(order)}\n`{module}` is skipped, so nothing inside "
                f"it runs, yet the block uses `{program_site_name(program, inside[0])}`. Read the "
                "skipped module's own input or output instead."
            )
    return Schedule(
        consts=tuple(jaxpr.constvars),
        params=tuple(params),
        pre=Stage(PRE, (), sub_jaxpr(PRE), None),
        stages=stages,
        outvars=tuple(jaxpr.outvars),
        last=max(orders, default=PRE),
        stop=program.stop,
    )


def pruned(stage: Stage, needed: set[Any], effects: bool = False) -> Stage | None:
    """The part of ``stage``'s equations that computes the ``needed`` variables, and,
    with ``effects``, its effectful equations (its reads are kept); None when nothing is
    left.

    Example::

        >>> # each generation step recomputes only the part of the pre stage it uses
        >>> # pruned(plan.pre, {v}, effects=step == 0)
    """
    if stage.jaxpr is None:
        return None
    keep = []
    wanted = set(needed)
    for eqn in reversed(stage.jaxpr.eqns):
        if any(v in wanted for v in eqn.outvars) or (effects and eqn.effects):
            keep.append(eqn)
            wanted.update(v for v in eqn.invars if isinstance(v, Var))
    if not keep:
        return None
    keep.reverse()
    outputs = [v for e in keep for v in e.outvars if v in needed]
    inputs = [v for v in stage.jaxpr.invars if v in wanted]
    jaxpr = Jaxpr([], inputs, outputs, keep, frozenset().union(*(e.effects for e in keep)),
                  debug_info=stage.jaxpr.debug_info)
    return dataclasses.replace(stage, jaxpr=jaxpr)


def atom_value(env: dict[Var, Any], atom: Any) -> Any:
    """The value of a jaxpr atom: a literal's own, or the environment's."""
    return atom.val if isinstance(atom, Literal) else env[atom]
