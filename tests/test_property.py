"""Random intervention programs equal a hand-written interceptor's forward.

Hypothesis draws small programs -- reads of module inputs and outputs,
arithmetic on what was read, writes at random sites, saves -- over a small
multi-block linen model, runs each with jnnsight (``model.intervene`` and a
``with model.trace(x):`` block), and compares the saves and the model's output
with a plain ``flax.linen.intercept_methods`` interceptor that interprets the
same program eagerly as the forward reaches each site.

Semantics the reference implements (nnsight's):

* a read of a site sees the forward's value there, which already carries every
  write to sites earlier in forward order; a read that comes after a write to
  the same site in the program sees the written value;
* the last write to a site in the program is the one the forward uses;
* a write whose value needs a site the forward reaches only later is a
  ``CausalityError``, raised before anything runs.

A program is a tuple of ops; value ops append to a list of values:

    ("read", site)              the site's value
    ("const", c)                an array filled with c
    ("add", i, j)               values[i] + values[j]
    ("mul", i, c)               values[i] * c
    ("tanh", i)                 jnp.tanh(values[i])
    ("setcol", i, j, col)       values[i].at[:, col].set(values[j][:, col])

and effect ops do not:

    ("write", site, i)          the site's value becomes values[i]
    ("save", i)                 values[i] is returned

``site`` is an index into ``SITES``, the model's sites in forward order.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jnnsight
from jnnsight import CausalityError, NNsight

BATCH, WIDTH, BLOCKS = 2, 8, 4
TUPLE_BLOCK = 2  # this block returns a 1-tuple, as transformers' blocks do
SHARED_AFTER = (0, 2)  # the `shared` Dense runs after these blocks: two calls


# -- the model ------------------------------------------------------------------------


class Block(nn.Module):
    tuple_out: bool = False

    @nn.compact
    def __call__(self, x):
        h = x + jnp.tanh(nn.Dense(WIDTH, name="dense")(x))
        return (h,) if self.tuple_out else h


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(WIDTH, name="shared")
        x = nn.Dense(WIDTH, name="embed")(x)
        for i in range(BLOCKS):
            x = Block(tuple_out=i == TUPLE_BLOCK, name=f"block_{i}")(x)
            if i == TUPLE_BLOCK:
                x = x[0]
            if i in SHARED_AFTER:
                x = jnp.tanh(shared(x))
        return nn.Dense(WIDTH, name="head")(x)


@functools.lru_cache(maxsize=None)
def _built() -> tuple[Net, Any, jax.Array]:
    module = Net()
    key_x, key_init = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (BATCH, WIDTH))
    return module, module.init(key_init, x), x


# -- the reference ----------------------------------------------------------------------


class NonCausal(Exception):
    """The reference reached a site whose write needs a site not reached yet."""


class _NotYet(Exception):
    pass


def _site_interceptor(at_site):
    """A flax interceptor calling ``at_site((path, call, kind), array, tuple_out)``
    at every module input (first argument) and output (element 0 of a tuple)."""
    counts: dict[tuple[str, ...], int] = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        call = counts.get(path, 0)
        counts[path] = call + 1
        args = (at_site((path, call, "input"), args[0], False), *args[1:])
        out = next_fun(*args, **kwargs)
        if isinstance(out, tuple):
            return (at_site((path, call, "output"), out[0], True), *out[1:])
        return at_site((path, call, "output"), out, False)

    return interceptor


def _record_sites() -> tuple[tuple[tuple[str, ...], int, str, bool], ...]:
    """Every site as ``(path, call, kind, tuple_out)``, in forward order."""
    module, variables, x = _built()
    sites = []

    def record(key, value, tuple_out):
        assert value.shape == (BATCH, WIDTH)
        sites.append((*key, tuple_out))
        return value

    with nn.intercept_methods(_site_interceptor(record)):
        module.apply(variables, x)
    return tuple(sites)


SITES = _record_sites()
ORDER = {site[:3]: i for i, site in enumerate(SITES)}


def _value_op(op, get):
    kind = op[0]
    if kind == "const":
        return jnp.full((BATCH, WIDTH), op[1], jnp.float32)
    if kind == "add":
        return get(op[1]) + get(op[2])
    if kind == "mul":
        return get(op[1]) * op[2]
    if kind == "tanh":
        return jnp.tanh(get(op[1]))
    if kind == "setcol":
        col = op[3]
        return get(op[1]).at[:, col].set(get(op[2])[:, col])
    raise ValueError(op)


def reference(prog) -> tuple[Any, list[Any]]:
    """The model's output and the saves, computed eagerly under an interceptor.

    Raises NonCausal where a site's final write cannot be computed when the
    forward reaches the site.
    """
    module, variables, x = _built()
    # Resolve every read statically: a read after a write to the same site is
    # the written value; otherwise it is the forward's value at the site.
    values: list[tuple] = []
    last_write: dict[int, int] = {}
    saves: list[int] = []
    for op in prog:
        if op[0] == "read":
            s = op[1]
            values.append(("alias", last_write[s]) if s in last_write else ("site", s))
        elif op[0] == "write":
            last_write[op[1]] = op[2]
        elif op[0] == "save":
            saves.append(op[1])
        else:
            values.append(op)

    seen: dict[int, jax.Array] = {}  # site -> its value as the forward reached it
    memo: dict[int, jax.Array] = {}

    def get(i: int) -> jax.Array:
        if i not in memo:
            v = values[i]
            if v[0] == "site":
                if v[1] not in seen:
                    raise _NotYet
                memo[i] = seen[v[1]]
            elif v[0] == "alias":
                memo[i] = get(v[1])
            else:
                memo[i] = _value_op(v, get)
        return memo[i]

    def at_site(key, value, tuple_out):
        s = ORDER[key]
        seen[s] = value
        if s not in last_write:
            return value
        try:
            return get(last_write[s])
        except _NotYet:
            raise NonCausal(SITES[s]) from None

    with nn.intercept_methods(_site_interceptor(at_site)):
        out = module.apply(variables, x)
    return out, [get(i) for i in saves]


# -- jnnsight: the same program through envoys -------------------------------------------


def interpret(model: NNsight, prog) -> list[Any]:
    """Run ``prog`` against ``model``'s envoys, inside a trace body; the saves."""
    values: list[Any] = []
    saves: list[Any] = []
    cursor: dict[tuple[str, ...], int] = {}  # envoy path -> call it addresses (.next())

    def envoy_at(s: int):
        path, call, _, _ = SITES[s]
        envoy = model
        for name in path:
            envoy = getattr(envoy, name)
        at = cursor.get(path, 0)
        assert call >= at, "programs address a module's calls in increasing order"
        if call > at:
            envoy.next(call - at)
            cursor[path] = call
        return envoy

    for op in prog:
        kind = op[0]
        if kind == "read":
            _, _, site_kind, tuple_out = SITES[op[1]]
            envoy = envoy_at(op[1])
            if site_kind == "input":
                values.append(envoy.input)
            else:
                out = envoy.output
                values.append(out[0] if tuple_out else out)
        elif kind == "write":
            _, _, site_kind, tuple_out = SITES[op[1]]
            envoy = envoy_at(op[1])
            value = values[op[2]]
            if site_kind == "input":
                envoy.input = value
            elif tuple_out:
                envoy.output[0] = value
            else:
                envoy.output = value
        elif kind == "save":
            saves.append(values[op[1]])
        else:
            values.append(_value_op(op, values.__getitem__))
    return saves


def run_intervene(model: NNsight, x, prog) -> tuple[Any, list[Any]]:
    return model.intervene(lambda: interpret(model, prog))(model.variables, x)


def run_trace_block(model: NNsight, x, prog) -> tuple[Any, list[Any]]:
    with model.trace(x):
        saves = jnnsight.save(interpret(model, prog))
        out = model.output.save()
    return out, saves


# -- the programs ---------------------------------------------------------------------------

CONSTS = (-1.5, -0.5, 0.0, 0.25, 2.0)


@st.composite
def programs(draw, min_ops: int = 3, max_ops: int = 12) -> tuple:
    """A causal program: each write's value needs only sites up to its own.

    Returns ``(ops, stages, cursor, writes)``: the ops, the stage of each value
    (the latest site it needs, -1 for none), the call cursor per module path
    and the site -> value of the writes so far, for ``noncausal`` to extend.
    """
    ops: list[tuple] = []
    stages: list[int] = []
    cursor: dict[tuple[str, ...], int] = {}
    writes: dict[int, int] = {}

    # Most reads and writes go to a few sites of the program's own, so that
    # reads after writes and several writes to one site are common.
    pool = draw(st.lists(st.integers(0, len(SITES) - 1), min_size=1, max_size=4, unique=True))

    def addressable(s: int) -> bool:
        # a module's calls are addressed in increasing order (`.next()` only advances)
        path, call = SITES[s][:2]
        return call >= cursor.get(path, 0)

    def site_choice(lowest: int = 0) -> int | None:
        allowed = [s for s in range(lowest, len(SITES)) if addressable(s)]
        preferred = [s for s in pool if s in allowed]
        if not allowed:
            return None
        s = draw(st.sampled_from(preferred if preferred and draw(st.integers(0, 3)) else allowed))
        path, call = SITES[s][:2]
        cursor[path] = call
        return s

    for _ in range(draw(st.sampled_from(range(min_ops, max_ops + 1)))):
        n = len(stages)
        kinds = ["read", "const"] if n == 0 else [
            "read", "read", "add", "mul", "tanh", "setcol", "write", "write", "save", "save"]
        kind = draw(st.sampled_from(kinds))
        # values by how recent they are: shrinks towards the latest one
        value = st.integers(0, n - 1).map(lambda k, n=n: n - 1 - k) if n else None
        if kind == "read":
            s = site_choice()
            ops.append(("read", s))
            stages.append(stages[writes[s]] if s in writes else s)
        elif kind == "const":
            ops.append(("const", draw(st.sampled_from(CONSTS))))
            stages.append(-1)
        elif kind == "add":
            i, j = draw(value), draw(value)
            ops.append(("add", i, j))
            stages.append(max(stages[i], stages[j]))
        elif kind == "mul":
            i = draw(value)
            ops.append(("mul", i, draw(st.sampled_from(CONSTS))))
            stages.append(stages[i])
        elif kind == "tanh":
            i = draw(value)
            ops.append(("tanh", i))
            stages.append(stages[i])
        elif kind == "setcol":
            i, j = draw(value), draw(value)
            ops.append(("setcol", i, j, draw(st.integers(0, WIDTH - 1))))
            stages.append(max(stages[i], stages[j]))
        elif kind == "write":
            i = draw(value)
            s = site_choice(lowest=max(stages[i], 0))
            if s is None:
                continue
            ops.append(("write", s, i))
            writes[s] = i
        else:
            ops.append(("save", draw(value)))
    # save the last value, so every program computes something, or every value
    if stages:
        last = len(stages) - 1
        every = draw(st.booleans())
        ops.extend(("save", i) for i in (range(len(stages)) if every else [last]))
    return tuple(ops), stages, cursor, writes


@st.composite
def noncausal(draw) -> tuple:
    """A causal program, then a last write to a site before one its value needs."""
    ops, stages, cursor, writes = draw(programs(min_ops=1, max_ops=8))
    late = [i for i, s in enumerate(stages) if s > 0]
    if not late:  # make one: read a site after the first
        s = draw(st.sampled_from([i for i, (path, call, _, _) in enumerate(SITES)
                                  if i > 0 and call >= cursor.get(path, 0)]))
        cursor[SITES[s][0]] = SITES[s][1]
        ops = (*ops, ("read", s))
        stages = [*stages, stages[writes[s]] if s in writes else s]
        if stages[-1] <= 0:
            return None  # the read aliases an early write: rejected
        late = [len(stages) - 1]
    i = draw(st.sampled_from(late))
    earlier = [s for s in range(stages[i]) if SITES[s][1] >= cursor.get(SITES[s][0], 0)]
    if not earlier:
        return None
    s = draw(st.sampled_from(earlier))
    ops = (*ops, ("write", s, i))
    if draw(st.booleans()):
        ops = (*ops, ("save", i))
    return ops


def _is_noncausal(prog) -> bool:
    try:
        reference(prog)
    except NonCausal:
        return True
    return False


# -- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    module, variables, x = _built()
    return NNsight(module, variables), x


def assert_same(actual, expected) -> None:
    a_leaves = jax.tree_util.tree_leaves(actual)
    e_leaves = jax.tree_util.tree_leaves(expected)
    assert len(a_leaves) == len(e_leaves)
    for a, e in zip(a_leaves, e_leaves):
        assert jnp.shape(a) == jnp.shape(e)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_sites_cover_the_model():
    kinds = {(path, call, kind) for path, call, kind, _ in SITES}
    assert len(SITES) == 2 * (1 + 1 + 2 * BLOCKS + len(SHARED_AFTER) + 1)
    assert ((), 0, "input") == SITES[0][:3] and ((), 0, "output") == SITES[-1][:3]
    assert (("shared",), 1, "output") in kinds
    assert [s for s in SITES if s[3]] == [((f"block_{TUPLE_BLOCK}",), 0, "output", True)]


@pytest.mark.filterwarnings("ignore:this update's result")  # random programs leave some unused
@settings(max_examples=40, **SETTINGS)
@given(drawn=programs())
def test_random_programs_equal_the_reference(net, drawn):
    model, x = net
    prog = drawn[0]
    expected_out, expected_saves = reference(prog)
    out, saves = run_intervene(model, x, prog)
    assert_same(saves, expected_saves)
    assert_same(out, expected_out)
    # the same program as a `with` block
    out, saves = run_trace_block(model, x, prog)
    assert all(isinstance(s, jax.Array) for s in saves)
    assert_same(saves, expected_saves)
    assert_same(out, expected_out)


@pytest.mark.filterwarnings("ignore:this update's result")  # random programs leave some unused
@settings(max_examples=40, **SETTINGS)
@given(prog=noncausal())
def test_writes_from_the_future_raise_causality_error(net, prog):
    assume(prog is not None)
    model, x = net
    assert _is_noncausal(prog), prog  # the reference agrees the program needs the future
    with pytest.raises(CausalityError):
        run_intervene(model, x, prog)


# -- explicit examples ------------------------------------------------------------------


def _site(path: tuple[str, ...], kind: str, call: int = 0) -> int:
    return ORDER[(path, call, kind)]


def test_fixed_program_in_a_with_block(net):
    """A hand-picked program touching a tuple output, a second call, inputs and the
    final output, run as a `with` block and with `intervene`."""
    model, x = net
    b1 = _site(("block_1",), "output")
    b2 = _site(("block_2",), "output")  # a tuple
    shared1 = _site(("shared",), "output", call=1)
    d3_in = _site(("block_3", "dense"), "input")
    head_in = _site(("head",), "input")
    root_out = _site((), "output")
    prog = (
        ("read", b1),                 # v0
        ("mul", 0, -0.5),             # v1
        ("read", b2),                 # v2: block_2's output before the write
        ("write", b2, 1),             # block_2 := -0.5 * block_1
        ("read", b2),                 # v3: the written value
        ("read", shared1),            # v4: sees the write
        ("tanh", 4),                  # v5
        ("write", d3_in, 5),
        ("read", head_in),            # v6
        ("setcol", 6, 3, 2),          # v7
        ("write", root_out, 7),
        ("save", 2), ("save", 3), ("save", 4), ("save", 6), ("save", 7),
    )
    expected_out, expected_saves = reference(prog)
    out, saves = run_trace_block(model, x, prog)
    assert_same(saves, expected_saves)
    assert_same(out, expected_out)
    assert_same(out, saves[-1])
    out2, saves2 = run_intervene(model, x, prog)
    assert_same(saves2, expected_saves)
    assert_same(out2, expected_out)


def test_fixed_noncausal_program_in_a_with_block(net):
    model, x = net
    prog = (
        ("read", _site(("block_3",), "output")),
        ("write", _site(("block_1",), "output"), 0),
    )
    assert _is_noncausal(prog)
    with pytest.raises(CausalityError):
        run_trace_block(model, x, prog)
