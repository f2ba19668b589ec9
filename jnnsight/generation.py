"""Generation with interventions: compiled key/value-cache decoding, per-step addressing.

``lm.generate(prompt, max_new_tokens=n)`` runs the model on the prompt (step 0)
and then on one new token per step (steps 1 to n - 1), each step a jitted
forward over a static-shape key/value cache. The block's body runs once, against
every step's sites at the same time (:mod:`jnnsight.tracing.steps`): a module
called once per forward has call ``s`` at step ``s``, so ``.next()`` is the next
step, ``tracer.iter[...]`` and ``tracer.all()`` run their body once per selected
step, and values flow freely from one step to a later one. Each step's part of
the program is woven into that step's forward; steps doing the same thing share
one compiled program, so the prompt pass and the decode step compile once per
shape and intervention.

Example::

    >>> with lm.generate("The Eiffel Tower is in the city of", max_new_tokens=8) as tracer:
    ...     first = lm.model.layers[-1].output[0].save()             # step 0, the prompt
    ...     second = lm.model.layers[-1].next().output[0].save()     # step 1
    ...     for step in tracer.iter[1:4]:                            # steps 1, 2, 3
    ...         lm.model.layers[10].output[0] = lm.model.layers[10].output[0] + steer
    ...     with tracer.all():                                       # every step
    ...         lm.model.layers[5].mlp.output = lm.model.layers[5].mlp.output * 0.5
    ...     tokens = tracer.result.save()
    >>> lm.tokenizer.batch_decode(tokens)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from .envoy import Envoy
from .errors import CaptureError, JnnsightError, SiteError, UserLine, at_user_line, warn_at_user_line
from .tracing import program as _program
from .tracing.capture import Capture
from .tracing.collate import Batch
from .tracing.discover import Site, abstract_leaves, is_int
from .tracing.execute import run_stage, woven_apply
from .tracing.gradients import split_backward
from .tracing.program import Builder
from .tracing.schedule import Schedule, atom_value, schedule, warn_unused_updates
from .tracing.steps import RESULT, RESULT_NAME, StepPlan, StepTable, split
from .tracing.tracer import Tracer

if TYPE_CHECKING:
    from .language import LanguageModel


@dataclass(frozen=True)
class GenerationConfig:
    """How tokens are chosen and when generation ends (static: part of the program key).

    Greedy by default; sampling keeps the ``top_k`` (50) largest logits unless told
    otherwise, as transformers does. First, as transformers' logits processors do, the logits
    of every token already in a row (its left padding excepted) are divided by
    ``repetition_penalty`` (multiplied, where negative), and ``eos_token_id`` is
    ruled out until ``min_new_tokens`` tokens exist. With ``do_sample``, logits
    are then divided by ``temperature``, cut to the ``top_k`` largest and to the
    smallest set of probability at least ``top_p`` (transformers' order), and
    sampled. A row that produced ``eos_token_id`` (one id, or a tuple of ids any of
    which ends a row, as Llama 3's ``generation_config.json`` lists) gets
    ``pad_token_id`` from then on; generation ends early once every row has. A row
    whose text comes to contain one of ``stop_strings`` has ended too (checked on
    the host after each step, :class:`StopStrings`; not part of the program key); as
    in transformers, it gets ``pad_token_id`` only where there is an end token.
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int = 0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_strings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}.")
        if not isinstance(self.temperature, (int, float)) or not (
                self.top_p is None or isinstance(self.top_p, (int, float))):
            raise ValueError(f"temperature and top_p must be Python numbers (they are part of "
                             f"the compiled step), got {self.temperature!r} and {self.top_p!r}.")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}.")
        if self.top_k is not None and not (is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(f"top_k must be an int >= 1 (or None), got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if not all(_is_id(i) for i in self.eos_ids):
            raise ValueError(f"eos_token_id must be a token id (an int >= 0) or a list of "
                             f"them, got {self.eos_token_id!r}.")
        if not _is_id(self.pad_token_id):
            raise ValueError(f"pad_token_id must be a token id (an int >= 0), got "
                             f"{self.pad_token_id!r}.")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}.")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}.")
        strings = self.stop_strings
        if isinstance(strings, str):
            strings = (strings,)
        if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be a string or a list of non-empty strings, got "
                             f"{self.stop_strings!r}.")
        object.__setattr__(self, "stop_strings", tuple(strings))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The ids that end a row (none without ``eos_token_id``)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def ends_rows(self) -> bool:
        """Whether a row can end before ``max_new_tokens`` (an end token or a stop string)."""
        return bool(self.eos_ids or self.stop_strings)

    def ended(self) -> str:
        """What ends rows, for messages."""
        eos = f"eos_token_id {self.eos_token_id}" if self.eos_ids else ""
        stops = f"one of stop_strings {list(self.stop_strings)}" if self.stop_strings else ""
        return " or ".join(filter(None, (eos, stops)))


class StopStrings:
    """transformers' ``stop_strings``, checked on the host: a row ends at the token that
    completes one of the strings in its text (its prompt's end included), as
    transformers' ``StopStringCriteria`` does.

    Example::

        >>> stops = StopStrings(("Paris",), lm.tokenizer, ids, mask)
        >>> stops.ended(np.asarray(new_tokens))     # after each step
        array([ True, False])
    """

    def __init__(self, strings: tuple[str, ...], tokenizer: Any, ids: jax.Array, mask: jax.Array):
        self.strings = strings
        self.tokenizer = tokenizer
        # Every token of a window this long decodes to at least a character, mostly.
        self.window = max(map(len, strings)) + 1
        self.rows = [row[keep != 0].tolist() for row, keep in zip(np.asarray(ids), np.asarray(mask))]

    def ended(self, tokens: np.ndarray) -> np.ndarray:
        """Append one new token per row; which rows' text now has a stop string that
        reaches into that token."""
        hits = []
        for row, token in zip(self.rows, tokens.tolist()):
            row.append(token)
            window = row[-self.window:]
            text = self.tokenizer.decode(window)
            start = len(self.tokenizer.decode(window[:-1]))  # where the new token's text begins
            hits.append(any(s in text[max(0, start - len(s) + 1):] for s in self.strings))
        return np.asarray(hits)


def _is_id(value: Any) -> bool:
    return is_int(value) and value >= 0


def processed_logits(logits: jax.Array, tokens: jax.Array, start: jax.Array, length: jax.Array,
                     new: jax.Array, config: GenerationConfig) -> jax.Array:
    """``logits`` ``[batch, vocab]`` after the repetition penalty and the minimum length.

    Row ``i`` so far is ``tokens[i, start[i]:length]``: ``start`` skips its left
    padding, as transformers does; ``length`` may be traced. ``new`` is the
    number of new tokens in each row.

    Example::

        >>> config = GenerationConfig(repetition_penalty=2.0)
        >>> processed_logits(jnp.array([[1.0, -1.0, 3.0]]), jnp.array([[2, 0, 1]]),
        ...                  jnp.array([1]), 3, 0, config)
        Array([[ 0.5, -2. ,  3. ]], dtype=float32)
    """
    logits = logits.astype(jnp.float32)
    if config.repetition_penalty != 1.0:
        position = jnp.arange(tokens.shape[1])
        present = (position >= start[:, None]) & (position < length)
        rows = jnp.arange(tokens.shape[0])[:, None]
        seen = jnp.zeros(logits.shape, bool).at[rows, tokens].max(present)
        penalty = config.repetition_penalty
        logits = jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)
    if config.min_new_tokens > 0 and config.eos_ids:
        early = jnp.asarray(new) < config.min_new_tokens
        eos = jnp.asarray(config.eos_ids)
        logits = logits.at[:, eos].set(jnp.where(early, -jnp.inf, logits[:, eos]))
    return logits


def choose_tokens(logits: jax.Array, key: jax.Array, config: GenerationConfig) -> jax.Array:
    """The next token of each row from its last-position ``logits`` ``[batch, vocab]``.

    Example::

        >>> choose_tokens(jnp.array([[0.0, 2.0, 1.0]]), jax.random.key(0), GenerationConfig())
        Array([1], dtype=int32)
    """
    logits = logits.astype(jnp.float32)
    if not config.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    floor = jnp.finfo(jnp.float32).min
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, floor, logits)
    if config.top_p is not None and config.top_p < 1:
        ascending = jnp.sort(logits, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        cut = (cumulative <= 1 - config.top_p).at[:, -1].set(False)
        smallest_kept = jnp.take_along_axis(ascending, jnp.argmin(cut, axis=-1)[:, None], axis=-1)
        logits = jnp.where(logits < smallest_kept, floor, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# -- what a block writes -------------------------------------------------------------


class GeneratorEnvoy(Envoy):
    """``lm.generator``: ``.output`` is the generated tokens ``[batch, prompt + new]``."""

    @property
    def _name(self) -> str:
        return RESULT_NAME

    @property
    def output(self) -> Any:
        """The prompt and the generated tokens, left-padded rows as the batch has them."""
        builder = _program.current()
        if builder is not None and not isinstance(builder.table, StepTable):
            raise SiteError(at_user_line(
                "`lm.generator.output` (and `tracer.result`) exist in `lm.generate(...)` "
                "blocks; a trace's output is `lm.output`."
            ))
        return Envoy._read(self, "output")

    @output.setter
    def output(self, value: Any) -> None:
        raise SiteError(at_user_line(
            "the generated tokens (`lm.generator.output`, `tracer.result`) can be read "
            "and saved, not written. Edit the logits (`lm.lm_head.output`) to change "
            "which tokens are chosen."
        ))


class _Steps:
    """``tracer.iter[selection]``: a loop whose body addresses one step per iteration."""

    def __init__(self, steps: int):
        self._steps = steps

    def __iter__(self) -> Iterator[int]:
        """``for step in tracer.iter:`` loops over every step, as ``tracer.iter[:]`` does."""
        return iter(self[:])

    def __getitem__(self, selection: int | slice | list[int]) -> "_StepLoop":
        steps = self._steps
        if isinstance(selection, slice):
            chosen = list(range(steps))[selection]
            shown = f"tracer.iter[{selection.start}:{selection.stop}:{selection.step}]"
            if not chosen:
                warn_at_user_line(
                    f"{shown} selects no step of this generation's {steps} (0 to {steps - 1}): "
                    "the loop's body does not run."
                )
            elif selection.stop is not None and selection.stop > steps and (selection.step or 1) > 0:
                warn_at_user_line(
                    f"{shown} reaches past this generation's {steps} steps (0 to {steps - 1}): "
                    f"the loop runs steps {chosen[0]} to {chosen[-1]} only. Raise max_new_tokens "
                    "for the later ones."
                )
            return _StepLoop(chosen)
        if isinstance(selection, (jax.Array, jax.core.Tracer)) or not (
                is_int(selection) or isinstance(selection, (list, tuple, range))):
            raise TypeError(at_user_line(
                f"tracer.iter takes a step number, a slice or a list of step numbers (Python "
                f"ints), got {type(selection).__name__}: steps are chosen when the block is "
                "read, before anything runs."
            ))
        chosen = [selection] if is_int(selection) else list(selection)
        bad = [s for s in chosen if not is_int(s) or not -steps <= s < steps]
        if bad:
            raise IndexError(at_user_line(
                f"step {bad[0]!r} does not exist: this generation has {steps} step(s), "
                f"0 to {steps - 1} (step 0 is the prompt). Raise max_new_tokens."
            ))
        return _StepLoop([int(s) % steps for s in chosen])


class _StepLoop:
    """The steps ``tracer.iter[...]`` chose, to loop over with ``for``."""

    def __init__(self, chosen: list[int]):
        self._chosen = chosen

    def __iter__(self) -> Iterator[int]:
        return _at_steps(self._chosen)

    def __enter__(self) -> None:
        raise TypeError(at_user_line(
            "`with tracer.iter[...]:` is nnsight's older spelling: loop over the steps "
            "instead, `for step in tracer.iter[1:4]:` (or `with tracer.all():` for every step)."
        ))

    def __exit__(self, *exc: Any) -> None:  # `with` needs both to reach __enter__'s error
        return None


_UNBOUND = object()


def _at_steps(chosen: list[int], namespace: dict[str, Any] | None = None) -> Iterator[int]:
    """Address each chosen step in turn; after each, record the names the iteration bound
    (in ``namespace``, else in the frame running the loop) for :meth:`Builder.bind_names`."""
    builder = _require_builder("tracer.iter[...]")
    step, calls = builder.step, dict(builder.calls)

    def names() -> dict[str, Any]:
        return dict(namespace if namespace is not None else sys._getframe(2).f_locals)

    try:
        for s in chosen:
            builder.step = s
            builder.calls.clear()
            before = names()
            yield s
            builder.bind_names(s, {n: v for n, v in names().items() if before.get(n, _UNBOUND) is not v})
    finally:
        builder.step = step
        builder.calls.clear()
        builder.calls.update(calls)


def _require_builder(what: str) -> Builder:
    builder = _program.current()
    if builder is None:
        raise CaptureError(at_user_line(
            f"`{what}` belongs inside a generate block (inside an invoke's body when the "
            "block has invokes)."
        ))
    return builder


class _AllSteps:
    """``with tracer.all():`` the body runs once for every step."""

    def __init__(self, steps: int):
        self._steps = steps

    def __iter__(self) -> Iterator[int]:
        raise TypeError(at_user_line(
            "tracer.all() is a block, not a loop: write `with tracer.all():` (or loop with "
            "`for step in tracer.iter[:]:`)."
        ))

    def __enter__(self) -> "_AllSteps":
        _require_builder("tracer.all()")
        self._capture = Capture.enter(sys._getframe(1))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        capture = self._capture
        del self._capture
        if not capture.exit(exc_type):
            return False
        namespace = capture.namespace()
        for _ in _at_steps(list(range(self._steps)), namespace):
            exec(capture.body.code, namespace)
        return True


class GenerateTracer(Tracer):
    """The context of ``lm.generate(...)``: a trace over every step of a generation.

    Example::

        >>> with lm.generate("Hello", max_new_tokens=4) as tracer:
        ...     for step in tracer.iter[:]:
        ...         lm.lm_head.output = lm.lm_head.output.at[..., bad_token].set(-1e9)
        ...     tokens = tracer.result.save()
    """

    _spelling = "lm.generate(max_new_tokens=...)"

    def __init__(self, model: "LanguageModel", args: tuple, config: GenerationConfig,
                 key: jax.Array, progress: bool, tokenizer: Any = None):
        super().__init__(model, args, {})
        self.config = config
        self._key = key
        self._progress = progress
        self._tokenizer = tokenizer
        self.iter = _Steps(config.max_new_tokens)

    def all(self) -> _AllSteps:
        """A ``with`` block whose body applies to every step (``tracer.iter[:]``)."""
        return _AllSteps(self.config.max_new_tokens)

    @property
    def result(self) -> Any:
        """The prompt and generated tokens, ``[batch, prompt + max_new_tokens]``."""
        return self.model.generator.output

    @result.setter
    def result(self, value: Any) -> None:
        self.model.generator.output = value

    def _execute(self, batch: Batch, bodies: Callable[[], None]) -> tuple[dict[int, Any], Builder]:
        return generate(self.model, batch, bodies, self.config, self._key, self._progress,
                        self._tokenizer)

    def _rebind(self, namespace: dict[str, Any], names: frozenset[str], values: dict[int, Any],
                builder: Builder) -> None:
        """A name whose value holds saves of steps that never ran, bound in a step loop,
        gets what it held after the last iteration that ran (nnsight's loop ends there)."""
        for name in names:
            held = builder.saves_in(namespace.get(name))
            stopped = [values[id(v)].stopped for v in held if getattr(values[id(v)], "never_ran", False)]
            if not stopped:
                continue
            for step, bound in reversed(builder.loop_bindings):
                if step <= stopped[0] and name in bound:
                    if bound[name] is not namespace[name]:  # a list appended to stays
                        namespace[name] = bound[name]
                    break


# -- the loop -------------------------------------------------------------------------


class Unreached:
    """A saved value of a step that generation did not reach: any use is an error.

    A name the body of ``tracer.iter[...]`` or ``tracer.all()`` binds again at each
    step holds, as in nnsight, its value from the last step that ran instead
    (:meth:`GenerateTracer._rebind`); a list the body appends to keeps this marker
    for the steps that did not run.
    """

    never_ran = True

    def __init__(self, line: UserLine | None, stopped: int, why: str):
        self.stopped = stopped
        self._message = (
            f"{line}\nthis value belongs to a generation step that never ran: generation "
            f"ended after step {stopped} ({why}). Save values of earlier steps, or pass "
            "eos_token_id=None (and no stop_strings) to always run max_new_tokens steps."
        )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_message", "stopped"):
            raise AttributeError(name)
        raise JnnsightError(self._message)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise JnnsightError(self._message)

    # numpy, jnp and Python operators look these up on the type, not through __getattr__
    __array__ = __jax_array__ = __len__ = __iter__ = __getitem__ = __bool__ = _refuse
    __float__ = __int__ = __index__ = __neg__ = __pos__ = __abs__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __pow__ = __rpow__ = _refuse
    __matmul__ = __rmatmul__ = __mod__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __eq__ = __ne__ = _refuse  # type: ignore[assignment]
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "<value of a generation step that never ran>"


def _inputs(tokens_in: jax.Array, state: dict, positions: jax.Array, cache_position: jax.Array) -> tuple[tuple, dict]:
    return (tokens_in,), {
        "attention_mask": state["mask"],
        "position_ids": positions,
        "past_key_values": state["cache"],
        "cache_position": cache_position,
    }


def _prompt_positions(mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def _step_function(module: Any, plan: StepPlan, program: Schedule, config: GenerationConfig,
                   prompt: int, first: bool, donate: bool) -> Callable[..., Any]:
    """One jitted step: ``(variables, state, carry, consts, key, step) -> (state, carry, saves)``.

    With ``donate`` the old state's buffers (the key/value cache) become the new
    state's; not where a transformation traces the generation (``jax.grad``
    without ``jax.jit`` keeps the inputs for its backward pass).
    """

    def step(variables, state, carry, consts, key, index):
        env = dict(zip(plan.carry_in, carry))
        env.update(zip(program.consts, consts))
        leaves = jax.tree_util.tree_leaves(variables)
        for leaf, var in plan.params:
            env[var] = leaves[leaf]
        if plan.pre is not None:
            run_stage(plan.pre, env, None)
        if first:
            slot = 0
            ids = state["tokens"][:, :prompt]
            positions = _prompt_positions(state["mask"][:, :prompt])
        else:
            slot = prompt + index - 1
            ids = jax.lax.dynamic_slice_in_dim(state["tokens"], slot, 1, axis=1)
            positions = state["position"][:, None]
        args, kwargs = _inputs(ids, state, positions, jnp.asarray(slot, jnp.int32))
        out = woven_apply(module, plan.stages, env)(variables, *args, **kwargs)
        padding = jnp.argmax(state["mask"][:, :prompt] != 0, axis=1)  # each row's left padding
        logits = processed_logits(out.logits[:, -1], state["tokens"], padding, prompt + index, index,
                                  config)
        token = choose_tokens(logits, jax.random.fold_in(key, index), config)
        finished = state["finished"]
        if config.eos_ids:  # as transformers: rows pad after they ended only with an end token
            token = jnp.where(finished, config.pad_token_id, token)
            finished = finished | jnp.isin(token, jnp.asarray(config.eos_ids))
        new = {
            "tokens": jax.lax.dynamic_update_slice_in_dim(
                state["tokens"], token[:, None], prompt + index, axis=1),
            "mask": state["mask"],
            "cache": out.past_key_values,
            "position": positions[:, -1] + 1,
            "finished": finished,
        }
        carried = [atom_value(env, v) for v in plan.carry_out]
        return new, carried, [atom_value(env, program.outvars[i]) for i in plan.saves]

    return jax.jit(step, donate_argnums=(1,) if donate else ())


def _final_function(plan: StepPlan, program: Schedule) -> Callable[..., Any]:
    """The stage at the generated tokens: ``(variables, tokens, carry, consts) -> saves``."""
    (stage,) = plan.stages.values()

    def final(variables, tokens, carry, consts):
        env = dict(zip(plan.carry_in, carry))
        env.update(zip(program.consts, consts))
        leaves = jax.tree_util.tree_leaves(variables)
        for leaf, var in plan.params:
            env[var] = leaves[leaf]
        if plan.pre is not None:
            run_stage(plan.pre, env, None)
        run_stage(stage, env, [tokens])
        return [atom_value(env, program.outvars[i]) for i in plan.saves]

    return jax.jit(final)


def generate(lm: "LanguageModel", batch: Batch, bodies: Callable[[], None],
             config: GenerationConfig, key: jax.Array, progress: bool,
             tokenizer: Any = None) -> tuple[dict[int, Any], Builder]:
    """Run the block's program over a generation; the saved values by tracer id, and the
    builder. ``tokenizer`` reads the rows' text where ``config.stop_strings`` asks."""
    module = lm.module
    if not hasattr(module, "cache_shapes"):
        raise JnnsightError(
            f"{type(module).__name__} has no key/value cache (`cache_shapes`), so jnnsight "
            "cannot generate with it. jnnsight's GPT-2 and Llama families can."
        )
    variables = lm.variables
    ids, mask = batch.args[0], batch.kwargs["attention_mask"]
    rows, prompt = ids.shape
    if not isinstance(mask, jax.core.Tracer) and int(_replicated(jnp.min(mask[:, -1]))) == 0:
        row = int(_replicated(jnp.argmin(mask[:, -1])))
        raise JnnsightError(at_user_line(
            f"prompt row {row} ends in padding (its attention mask is 0 at "
            "the last position): generation appends each new token after the last position. "
            "Pad prompts on the left (`tokenizer.padding_side = 'left'`, as lm.tokenizer "
            "does), or pass the prompts as text."
        ))
    steps = config.max_new_tokens
    traced = isinstance(mask, jax.core.Tracer)
    fit = lm._check_generation(mask, steps, config.pad_token_id,
                               can_end=config.ends_rows and not traced)
    slots = prompt + steps
    state = {
        "tokens": jnp.concatenate([ids, jnp.full((rows, steps), config.pad_token_id, jnp.int32)], 1),
        "mask": jnp.concatenate([mask, jnp.ones((rows, steps), jnp.int32)], 1),
        "cache": jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                        module.cache_shapes(rows, slots)),
        "position": jnp.zeros((rows,), jnp.int32),
        "finished": jnp.zeros((rows,), bool),
    }

    # The sites of the prompt pass and of one decode step (cached by shapes), then all steps.
    positions = _prompt_positions(mask)
    first_args, first_kwargs = _inputs(ids, state, positions, jnp.int32(0))
    # Discovered as they are: a cache's head sizes would be symbols too, which the
    # models' key/value code cannot compare with the prompt's.
    first_key, first_table, avals = lm._site_table(
        variables, Batch(first_args, first_kwargs, batch.rows), families=False)
    step_table = step_key = None
    if steps > 1:
        step_args, step_kwargs = _inputs(ids[:, :1], state, positions[:, :1], jnp.int32(prompt))
        step_key, step_table, _ = lm._site_table(
            variables, Batch(step_args, step_kwargs, batch.rows), families=False)
    treedef, leaves = abstract_leaves(state["tokens"])
    result = Site(RESULT, 0, treedef, leaves, (True,))
    table = StepTable(first_table, step_table, steps, result)

    builder = Builder(table, avals)
    program = builder.run(bodies)
    if split_backward(program)[1] is not None:
        raise JnnsightError(at_user_line(
            "`loss.backward()` is not supported in a generate block: each step is its own "
            "compiled program. Take gradients in `lm.trace(...)` on the prompt plus the "
            "generated tokens."
        ))
    programs = lm._generation_programs
    plan_key = ("plans", first_key, step_key, steps, program.fingerprint)
    cut = programs.get(plan_key)
    if cut is None:
        warn_unused_updates(program)
        plan = schedule(program)
        cut = programs.put(plan_key, (plan, *split(plan, table)))
    plan, plans, final = cut
    consts = lm._outside(list(program.jaxpr.consts))
    shapes = tuple(v.aval for v in plan.consts)

    traced = traced or any(isinstance(leaf, jax.core.Tracer)
                           for leaf in jax.tree_util.tree_leaves((variables, state, consts, key)))
    stops = None
    if config.stop_strings:
        if traced or jax.process_count() > 1:
            raise JnnsightError(at_user_line(
                "stop_strings reads each step's tokens on the host, which "
                + ("a generation inside jax.jit or jax.grad does not have" if traced else
                   "a multi-process run does not do")
                + ": use eos_token_id, or cut the text after generation."
            ))
        stops = StopStrings(config.stop_strings, tokenizer, ids, mask)

    if fit is not None and traced:  # under jax.jit every step runs: all must fit
        lm._check_generation(mask, steps, config.pad_token_id, can_end=False)

    def compiled(plan_for_step: StepPlan, first: bool) -> Callable[..., Any]:
        k = ("step", first, first_key if first else step_key, prompt, config, shapes,
             plan_for_step.key, not traced)
        fn = programs.get(k)
        if fn is None:
            fn = programs.put(k, _step_function(module, plan_for_step, plan, config, prompt, first,
                                                donate=not traced))
        return fn

    # `tracer.stop()`: generation ends after the last step the block reads, writes or saves.
    needed = steps
    if program.stop:
        if final.stages or final.saves:
            warn_at_user_line(
                "`tracer.stop()` in a generate block that reads the generated tokens "
                "(`tracer.result`): every step runs to produce them."
            )
        else:
            needed = 1 + max((i for i, p in enumerate(plans) if p.stages or p.saves), default=0)
    if fit is not None:  # GPT-2's positions end before max_new_tokens: rows may end sooner
        needed = min(needed, fit)

    values: dict[int, Any] = {}
    carried: dict[Any, Any] = {}
    base_key = jax.random.key(0) if key is None else lm._outside([key])[0]  # on lm.mesh
    ran = 0
    bar = _progress_bar(needed, progress)
    try:
        for step, step_plan in enumerate(plans[:needed]):
            fn = compiled(step_plan, step == 0)
            state, out, saves = fn(variables, state, [carried[v] for v in step_plan.carry_in],
                                   consts, base_key, jnp.int32(step))
            carried.update(zip(step_plan.carry_out, out))
            values.update(zip(step_plan.saves, saves))
            ran = step + 1
            bar.update(1)
            if stops is not None:
                ended = stops.ended(np.asarray(state["tokens"])[:, prompt + step])
                if ended.any():
                    state["finished"] = state["finished"] | jnp.asarray(ended)
            finished = state["finished"]  # under jax.jit every step runs: rows pad after eos
            if (config.ends_rows and step + 1 < needed
                    and not isinstance(finished, jax.core.Tracer)
                    and bool(_replicated(finished.all()))):
                break
    finally:
        bar.close()

    tokens = state["tokens"]
    if final.stages and all(v in carried for v in final.carry_in):
        k = ("final", step_key or first_key, final.key, shapes)
        fn = programs.get(k) or programs.put(k, _final_function(final, plan))
        values.update(zip(final.saves, fn(variables, tokens, [carried[v] for v in final.carry_in], consts)))

    # Saves that no step computes: literals, outside arrays, parameters.
    outside = {v: c for v, c in zip(plan.consts, consts)}
    leaves = jax.tree_util.tree_leaves(variables)
    outside.update((v, leaves[j]) for j, v in plan.params)
    for i, atom in enumerate(plan.outvars):
        if i not in values and (isinstance(atom, Literal) or atom in outside):
            values[i] = atom_value(outside, atom)
    why = f"every row had produced {config.ended()}"
    if fit is not None and ran == fit and not bool(_replicated(state["finished"].all())):
        why = (f"the longest row filled this model's {lm._config_value('n_positions')} position "
               "embeddings (n_positions) before every row had ended")
        warn_at_user_line(f"generation stopped after step {ran - 1}: {why}; the rows that had "
                          "not ended end there.")
    saved = list(builder.saved)
    missing = [i for i in range(len(saved)) if i not in values]
    if missing:  # (edits of steps that did not run need no word: as in nnsight)
        lines = [builder.save_lines.get(saved[i]) for i in missing]
        warn_at_user_line(
            f"generation ended after step {ran - 1} ({why}); the block's saves at later "
            f"steps did not run{f', first at {lines[0]}' if lines[0] else ''}."
        )
        for i in missing:
            values[i] = Unreached(builder.save_lines.get(saved[i]), ran - 1, why)
    return {saved[i]: values[i] for i in range(len(saved))}, builder


def _replicated(value: jax.Array) -> np.ndarray:
    """A value every device holds whole (a reduction), read from this process's copy: a
    multi-host run cannot fetch arrays that span other processes' devices."""
    if value.is_fully_addressable:
        return np.asarray(value)
    return np.asarray(value.addressable_shards[0].data)


def _progress_bar(steps: int, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=steps, desc="generate", unit="token", disable=not show, leave=False)


__all__ = ["GenerationConfig", "GenerateTracer", "GeneratorEnvoy", "StopStrings", "choose_tokens",
           "generate"]
