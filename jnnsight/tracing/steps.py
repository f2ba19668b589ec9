"""Steps of a generation: one site table over every step, and a schedule cut per step.

Generation runs the model once on the prompt (step 0) and once per new token
(steps 1, 2, ...), each a separately compiled forward. The block's program is
traced against a :class:`StepTable`, where a module called once per forward has
call index ``s`` at step ``s`` (so ``.next()`` moves to the next step, as in
nnsight), and the generated tokens are one more site at the very end. Its
schedule is then cut into one :class:`StepPlan` per step: the stages that run
in that step's forward, the values that step takes from earlier steps and hands
on to later ones, and the saves it makes. Two steps doing the same thing (every
step of ``tracer.all()``) have equal plan keys and share one compiled program.

Example::

    >>> # table = StepTable(prompt_table, step_table, steps=8, result=result_site)
    >>> # plans, final = split(schedule(program), table)
    >>> # plans[3].key == plans[4].key     # same edits at steps 3 and 4: one program
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Sequence

from jax.extend.core import Literal, Var

from .discover import Site, SiteKey, SiteTable, call_name, site_name
from .program import _value_key, jaxpr_key
from .schedule import Schedule, Stage, pruned

RESULT_PATH = ("generator",)
RESULT_NAME = "model.generator"  # how messages name it: not a child of the model, no E_
RESULT: SiteKey = (RESULT_PATH, 0, "output")


class StepTable:
    """The sites of a whole generation, numbered in the order they run.

    Step 0 is the prompt's forward (``first``); steps ``1 .. steps - 1`` are one
    forward each of ``step``'s sites; the ``result`` site (the generated tokens)
    comes last. Sites are made when asked for, so a long generation costs no
    more than its two tables.
    """

    def __init__(self, first: SiteTable, step: SiteTable | None, steps: int, result: Site):
        self.first, self.step, self.steps = first, step, steps
        self._n0 = len(first.sites)
        self._n1 = len(step.sites) if step is not None else 0
        total = self._n0 + self._n1 * (steps - 1)
        self.result = dataclasses.replace(result, key=RESULT, order=total)
        self.sites: Sequence[Site] = _Sites(self, total + 1)
        self._made: dict[int, Site] = {}
        modules = dict(first.modules)
        for path, info in (step.modules.items() if step is not None else ()):
            before = first.modules[path].calls if path in first.modules else 0
            modules[path] = dataclasses.replace(info, calls=before + info.calls * (steps - 1))
        self.modules = modules

    def _calls(self, table: SiteTable | None, path: tuple[str, ...]) -> int:
        info = table.modules.get(path) if table is not None else None
        return 0 if info is None else info.calls

    def call_offset(self, path: tuple[str, ...], step: int) -> int:
        """The call index of ``path``'s first call at ``step``."""
        if step == 0 or path == RESULT_PATH:
            return 0
        return self._calls(self.first, path) + (step - 1) * self._calls(self.step, path)

    def locate(self, order: int) -> tuple[int, SiteKey]:
        """The step a site runs at and its key within that step's forward."""
        if order < self._n0:
            return 0, self.first.sites[order].key
        if order == self.result.order:
            return self.steps, RESULT
        step, local = divmod(order - self._n0, self._n1)
        return step + 1, self.step.sites[local].key

    def at(self, order: int) -> Site:
        site = self._made.get(order)
        if site is None:
            if order == self.result.order:
                return self.result
            step, (path, call, kind) = self.locate(order)
            local = (self.first if step == 0 else self.step).get((path, call, kind))
            key = (path, call + self.call_offset(path, step), kind)
            site = self._made[order] = dataclasses.replace(local, key=key, order=order)
        return site

    def get(self, key: SiteKey) -> Site | None:
        if key == RESULT:
            return self.result
        path, call, kind = key
        before = self._calls(self.first, path)
        if call < before:
            local, step, base = self.first.get(key), 0, 0
        else:
            per_step = self._calls(self.step, path)
            if per_step == 0:
                return None
            step, call = 1 + (call - before) // per_step, (call - before) % per_step
            if step >= self.steps:
                return None
            local, base = self.step.get((path, call, kind)), self._n0 + (step - 1) * self._n1
        if local is None:
            return None
        return self.at(base + local.order)

    def name(self, key: SiteKey) -> str:
        """How the user addresses the site ``key``; the generated tokens are ``model.generator.output``."""
        if key[0] == RESULT_PATH:
            return call_name(RESULT_NAME, 0, key[2])
        return site_name(key, self.modules.__contains__)

    def missing(self, key: SiteKey, name: str) -> str:
        path, call, kind = key
        if path == RESULT_PATH:
            return f"{name}: the generated tokens have one value, read it without .next()."
        first, per_step = self._calls(self.first, path), self._calls(self.step, path)
        if first == 0 and per_step == 0:
            return self.first.missing(key, name)
        step = "" if per_step == 0 else (
            f"that call is at step {1 + (call - first) // per_step} (`.next()` counts on from "
            "the step a `tracer.iter` loop or `tracer.all()` body addresses), and ")
        return (
            f"{name} is never reached: {step}this generation runs {self.steps} step(s) (steps "
            f"0 to {self.steps - 1}, step 0 the prompt); the module runs "
            f"{first} time(s) on the prompt and {per_step} time(s) per later step. "
            "Raise max_new_tokens, or address an earlier step."
        )


class _Sites(Sequence[Site]):
    def __init__(self, table: StepTable, length: int):
        self._table, self._length = table, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, order: int) -> Site:  # type: ignore[override]
        if not 0 <= order < self._length:
            raise IndexError(order)
        return self._table.at(order)

    def __iter__(self) -> Iterator[Site]:
        return (self._table.at(i) for i in range(self._length))


@dataclass(frozen=True)
class StepPlan:
    """What one step does: its stages, the values it takes and hands on, its saves.

    Attributes:
      pre: the stage that needs no site (run by every step), or None.
      stages: the step's stages by site key within its own forward.
      params: ``(leaf index, var)`` of the parameters the step reads.
      carry_in / carry_out: the variables it receives from earlier steps and
        the atoms it hands to later ones, in a fixed order.
      saves: indices into the program's saves of those this step computes.
      key: equal for two plans that do the same computation on the same
        positions of their arguments: they share one compiled program.
    """

    pre: Stage | None
    stages: dict[SiteKey, Stage]
    params: tuple[tuple[int, Var], ...]
    carry_in: tuple[Var, ...]
    carry_out: tuple[Var, ...]
    saves: tuple[int, ...]
    key: Hashable


def _atoms(stage: Stage) -> list[Any]:
    """The variables a stage uses from elsewhere."""
    used = list(stage.jaxpr.invars) if stage.jaxpr is not None else []
    used += list(stage.write or ()) + list(stage.skip or ())
    return [v for v in used if isinstance(v, Var)]


def _defined(stage: Stage) -> list[Var]:
    return [v for _, v in stage.reads] + (list(stage.jaxpr.outvars) if stage.jaxpr is not None else [])


def split(plan: Schedule, table: StepTable) -> tuple[list[StepPlan], StepPlan]:
    """``plan`` cut into one :class:`StepPlan` per step, and one for the generated tokens."""
    steps = table.steps
    per_step: list[dict[SiteKey, Stage]] = [{} for _ in range(steps + 1)]
    for stage in sorted(plan.stages.values(), key=lambda s: s.order):
        step, local = table.locate(stage.order)
        per_step[step][local] = stage

    params = dict((v, leaf) for leaf, v in plan.params)
    # The stage before any site needs only outside arrays and parameters: every step
    # runs it again rather than receiving its values, so that equal steps stay equal.
    pre = plan.pre if plan.pre.jaxpr is not None else None
    born: dict[Var, int] = {}  # the step that computes each variable
    order: dict[Var, int] = {}  # a fixed order for carried variables
    for step, stages in enumerate(per_step):
        for stage in stages.values():
            for v in _defined(stage):
                born[v] = step
                order[v] = len(order)
    last_use: dict[Var, int] = {}
    for step, stages in enumerate(per_step):
        for stage in stages.values():
            for v in _atoms(stage):
                if v in born:
                    last_use[v] = max(last_use.get(v, -1), step)

    def live(after: int) -> tuple[Var, ...]:
        """Variables computed at or before step ``after`` that a later step needs."""
        kept = [v for v, s in born.items() if s <= after < last_use.get(v, -1)]
        return tuple(sorted(kept, key=order.__getitem__))

    saves_at: dict[int, list[int]] = {}
    from_pre = {v for e in pre.jaxpr.eqns for v in e.outvars} if pre is not None else set()
    for i, v in enumerate(plan.outvars):
        if isinstance(v, Var) and (v in born or v in from_pre):
            saves_at.setdefault(born.get(v, 0), []).append(i)

    plans = []
    for step, stages in enumerate(per_step):
        used = {v for stage in stages.values() for v in _atoms(stage)}
        needed = used | {plan.outvars[i] for i in saves_at.get(step, ())}
        step_pre = pruned(pre, needed, effects=step == 0) if pre is not None else None
        if step_pre is not None:
            used |= set(_atoms(step_pre))
        step_params = tuple(sorted((params[v], v) for v in used if v in params))
        plans.append(_plan(
            step_pre, stages, step_params, live(step - 1) if step else (),
            live(step) if step < steps else (), tuple(saves_at.get(step, ())), plan,
        ))
    return plans[:steps], plans[steps]


def _plan(pre: Stage | None, stages: dict[SiteKey, Stage], params: tuple[tuple[int, Var], ...],
          carry_in: tuple[Var, ...], carry_out: tuple[Var, ...], saves: tuple[int, ...],
          plan: Schedule) -> StepPlan:
    names: dict[Any, Hashable] = {}
    for i, v in enumerate(carry_in):
        names[v] = ("in", i)
    for j, v in enumerate(plan.consts):
        names[v] = ("const", j)
    for leaf, v in params:
        names[v] = ("param", leaf)

    def name(atom: Any) -> Hashable:
        if isinstance(atom, Literal):
            return ("literal", _value_key(atom.val), atom.aval)
        return names[atom]

    def define(v: Var) -> Hashable:
        names[v] = ("local", len(names))
        return names[v]

    parts: list[Hashable] = []
    for local, stage in ([(None, pre)] if pre else []) + list(stages.items()):
        reads = tuple((leaf, define(v)) for leaf, v in stage.reads)
        body = None
        if stage.jaxpr is not None:
            ins = tuple(name(v) for v in stage.jaxpr.invars)
            body = (jaxpr_key(stage.jaxpr), ins, tuple(define(v) for v in stage.jaxpr.outvars))
        write = None if stage.write is None else tuple(name(a) for a in stage.write)
        skip = None if stage.skip is None else tuple(name(a) for a in stage.skip)
        parts.append((local, reads, body, write, skip))
    parts.append(tuple(name(v) for v in carry_out))
    parts.append(tuple(name(plan.outvars[i]) for i in saves))
    parts.append(len(carry_in))
    return StepPlan(pre, stages, params, carry_in, carry_out, saves, tuple(parts))


__all__ = ["RESULT", "RESULT_NAME", "RESULT_PATH", "StepTable", "StepPlan", "split"]
