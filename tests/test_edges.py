"""Behaviours at the edges of the engine, each checked against a hand-written forward:
input-dependent model structure, callbacks, static arguments, unbatched values in
invokes, reads inside JAX transforms, dict and nested outputs, names in function frames,
line tracers, and the forward really stopping."""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import warnings
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnnsight
from jnnsight import NNsight

from conftest import assert_close, reference


class ShapeDependent(nn.Module):
    """Runs an extra module for 5 features: site numbers differ between input shapes."""

    @nn.compact
    def __call__(self, x, double: bool = False):
        h = x[:, :4]
        if x.shape[1] > 4:
            h = nn.Dense(4, name="pre")(h)
        h = nn.Dense(4, name="a")(h)
        out = nn.Dense(4, name="b")(h)
        return out * 2 if double else out


@pytest.fixture(scope="module")
def shape_dependent():
    module = ShapeDependent()
    x5 = jax.random.normal(jax.random.key(1), (2, 5))
    variables = jax.tree_util.tree_map(lambda p: p + 0.3, module.init(jax.random.key(0), x5))
    return NNsight(module, variables), x5


def test_a_program_is_cached_with_its_site_table(shape_dependent):
    model, x5 = shape_dependent

    def zero(path):
        return lambda p, c, out: out * 0 if p == path else out

    with model.trace(x5[:, :4]):            # site 2 is `a` here ...
        model.a.output = model.a.output * 0
        first = model.output.save()
    with model.trace(x5):                   # ... and `pre` here: same jaxpr, other site
        model.pre.output = model.pre.output * 0
        second = model.output.save()
    assert_close(first, reference(model, x5[:, :4], edit=zero(("a",)))[0])
    assert_close(second, reference(model, x5, edit=zero(("pre",)))[0])


def test_static_arguments_reach_the_model(shape_dependent):
    model, x5 = shape_dependent
    with model.trace(x5, double=True):
        kwarg = model.output.save()
    with model.trace(x5, True):
        positional = model.output.save()
    expected = model.module.apply(model.variables, x5, double=True)
    assert_close(kwarg, expected)
    assert_close(positional, expected)


def test_blocks_with_different_callbacks_do_not_share_a_program(toy):
    model, tokens = toy

    def apply(f):
        with model.trace(tokens):
            h = model.h[0].output[0]
            y = jax.pure_callback(f, jax.ShapeDtypeStruct(h.shape, h.dtype), h).save()
        return y

    doubled = apply(lambda a: np.asarray(a) * 2)
    tripled = apply(lambda a: np.asarray(a) * 3)
    assert_close(tripled, doubled * 1.5, tol=1e-4)


def test_blocks_with_literals_0_and_minus_0_do_not_share_a_program(toy):
    model, tokens = toy

    def sign(c: float):
        with model.trace(tokens):
            h = model.h[0].output[0]
            s = (h[0, 0, :2] * 0.0 + jnp.copysign(1.0, jnp.full((2,), c))).save()
        return s

    np.testing.assert_array_equal(sign(0.0), [1.0, 1.0])
    np.testing.assert_array_equal(sign(-0.0), [-1.0, -1.0])  # 0.0 == -0.0 in Python


def test_invokes_see_values_without_a_batch_axis_whole():
    from jnnsight.toy import toy_model

    model, tokens = toy_model(layers=1, width=8, heads=2, vocab=16, length=2, batch=2)
    with model.trace() as tracer:           # 2 rows of 2 positions: wpe is [length, width]
        with tracer.invoke(tokens[:1]):
            first = model.wpe.output.save()
        with tracer.invoke(tokens[1:]):
            second = model.wpe.output.save()
            hidden = model.h[0].output[0].save()
    _, seen = reference(model, tokens)
    assert_close(first, seen[(("wpe",), 0)])
    assert_close(second, seen[(("wpe",), 0)])
    assert_close(hidden, seen[(("h_0",), 0)][0][1:])
    # a write there, in one invoke, is every invoke's: it says so
    with pytest.warns(UserWarning, match="has no batch axis .* changes it for every invoke") as caught:
        with model.trace() as tracer:
            with tracer.invoke(tokens[:1]):
                model.wpe.output = model.wpe.output * 0
            with tracer.invoke(tokens[1:]):
                other = model.output.save()
    assert caught[0].filename == __file__
    edited, _ = reference(model, tokens, edit=lambda path, call, out: out * 0 if path == ("wpe",) else out)
    assert_close(other, edited[1:])


class Noised(nn.Module):
    """Takes a PRNG key and a table: arguments with no row per example."""

    @nn.compact
    def __call__(self, x, key, table):
        noise = jax.random.normal(key, x.shape[1:])
        return nn.Dense(3, name="d")(x + noise) @ table


def test_invokes_pass_a_key_or_table_once_and_must_agree_on_it():
    x = jax.random.normal(jax.random.key(2), (3, 4))
    key, table = jax.random.key(7), jnp.arange(6.0).reshape(3, 2)
    module = Noised()
    model = NNsight(module, module.init(jax.random.key(0), x, key, table))
    with model.trace() as tracer:
        with tracer.invoke(x[:1], key, table):
            first = model.output.save()
        with tracer.invoke(x[1:], jax.random.key(7), jnp.arange(6.0).reshape(3, 2)):
            rest = model.output.save()
    expected = module.apply(model.variables, x, key, table)
    assert_close(first, expected[:1])
    assert_close(rest, expected[1:])
    with pytest.raises(jnnsight.JnnsightError, match=r"`args\[2\]` has shape \[3, 2\] in this "
                       r"invoke, whose input has 2 rows, and one row per example in another"):
        with model.trace() as tracer:
            with tracer.invoke(x[:1], key, table[:1]):
                pass
            with tracer.invoke(x[1:], key, table):
                pass
    for other, name in (((x[1:], jax.random.key(8), table), "args[1]"),
                        ((x[1:], key, table + 1), "args[2]")):
        with pytest.raises(jnnsight.JnnsightError, match=rf"`{re.escape(name)}` has no row per example") as error:
            with model.trace() as tracer:
                with tracer.invoke(x[:1], key, table):
                    pass
                with tracer.invoke(*other):
                    pass
        assert "test_edges.py" in str(error.value).splitlines()[0]


class TableFirst(nn.Module):
    @nn.compact
    def __call__(self, table, x):
        return nn.Dense(2, name="d")(x) @ table


def test_a_table_before_the_input_does_not_set_the_invokes_rows():
    """Rows come from the first argument that differs between invokes, not the first array."""
    x = jax.random.normal(jax.random.key(2), (3, 4))
    table = jax.random.normal(jax.random.key(3), (2, 5))
    module = TableFirst()
    model = NNsight(module, module.init(jax.random.key(0), table, x))
    with model.trace() as tracer:
        with tracer.invoke(table, x[:1]):
            first = model.d.output.save()
        with tracer.invoke(table, x[1:]):
            model.d.output = model.d.output * 2
            rest = model.output.save()
    dense = nn.Dense(2).apply({"params": model.variables["params"]["d"]}, x)
    assert_close(first, dense[:1])
    assert_close(rest, 2 * dense[1:] @ table)


class ReadsTable(nn.Module):
    @nn.compact
    def __call__(self, x, table):
        return nn.Dense(3, name="d")(x), nn.Dense(4, name="t")(table)


def test_a_table_passed_once_and_the_same_shape_passed_per_row_are_other_forwards():
    """Equal shapes, other batching: the site tables are not shared between them."""
    x = jax.random.normal(jax.random.key(2), (3, 4))
    table = jnp.arange(6.0).reshape(3, 2)
    module = ReadsTable()
    model = NNsight(module, module.init(jax.random.key(0), x, table))
    for per_row in (False, True):
        with model.trace() as tracer:
            with tracer.invoke(x[:1], table[:1] if per_row else table):
                seen = model.t.output.save()
            with tracer.invoke(x[1:], table[1:] if per_row else table):
                pass
        whole = module.apply(model.variables, x, table)[1]
        assert_close(seen, whole[:1] if per_row else whole)


class FixedBatch(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="d")(x.reshape(3, 2, 2))


def test_a_model_that_runs_at_one_batch_size_only_says_why_invokes_need_more():
    x = jax.random.normal(jax.random.key(2), (3, 4))
    module = FixedBatch()
    model = NNsight(module, module.init(jax.random.key(0), x))
    with model.trace(x):                    # one input: no second batch size is needed
        whole = model.output.save()
    assert_close(whole, module.apply(model.variables, x))
    with pytest.raises(jnnsight.JnnsightError, match="fails on a batch one row larger .*reshape"):
        with model.trace() as tracer:
            with tracer.invoke(x[:1]):
                pass
            with tracer.invoke(x[1:]):
                pass


class WithCount(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="d")(x), 3          # a static leaf next to the batched one


class UsesCount(nn.Module):
    @nn.compact
    def __call__(self, x):
        h, n = WithCount(name="inner")(x)
        g, table = WithTable(name="tabled")(x)
        return h * n + g * table.sum()


class WithTable(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="d")(x), self.param("table", nn.initializers.ones, (5, 3))


def test_a_write_in_one_invoke_next_to_a_static_leaf_does_not_warn():
    x = jax.random.normal(jax.random.key(2), (2, 4))
    module = UsesCount()
    model = NNsight(module, module.init(jax.random.key(0), x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it said "has no batch axis": the 3 has none
        with model.trace() as tracer:
            with tracer.invoke(x[:1]):
                model.inner.output = (model.inner.output[0] * 0, 3)
                model.tabled.output[0] = model.tabled.output[0] * 0   # the table unchanged
            with tracer.invoke(x[1:]):
                pass
            with tracer.invoke():
                out = model.output.save()

    def edit(path, call, out):
        if path in (("inner",), ("tabled",)):
            return (out[0].at[:1].multiply(0), out[1])
        return out

    assert_close(out, reference(model, x, edit=edit)[0])


def test_sites_and_parameters_read_inside_jax_transforms_in_a_block(toy):
    model, tokens = toy

    @jax.jit
    def helper(h):
        return h + model.h[1].output[0]

    with model.trace(tokens):
        h = model.h[0].output[0]
        jitted = helper(h).save()
        mapped = jax.lax.map(lambda i: model.h[2].output[0].sum() * i, jnp.arange(3.0)).save()
        grad = jax.grad(lambda x: model.lm_head(model.ln_f(x))[..., 0].sum())(h).save()
    _, seen = reference(model, tokens)
    h0, h1, h2 = (seen[((f"h_{i}",), 0)][0] for i in range(3))
    assert_close(jitted, h0 + h1)
    assert_close(mapped, h2.sum() * jnp.arange(3.0), tol=1e-3)
    params = model.variables["params"]

    def lens(x):
        normed = nn.LayerNorm().apply({"params": params["ln_f"]}, x)
        return (normed @ params["lm_head"]["kernel"])[..., 0].sum()

    assert_close(grad, jax.grad(lens)(h0), tol=1e-4)


class DictOutput(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4, name="d")(x)
        return {"h": y, "aux": (y * 2, y * 3)}


class UsesDict(nn.Module):
    @nn.compact
    def __call__(self, x):
        o = DictOutput(name="inner")(x)
        return o["h"] + o["aux"][0] + o["aux"][1]


def test_dict_outputs_and_nested_element_writes():
    x = jax.random.normal(jax.random.key(2), (2, 3))
    module = UsesDict()
    model = NNsight(module, module.init(jax.random.key(0), x))
    with model.trace(x):
        o = model.inner.output
        o["aux"][0] = o["aux"][0] * 0
        o["h"] = o["h"] * 2
        seen_after = o["h"].save()
        out = model.output.save()

    def edit(path, call, out):
        if path == ("inner",):
            return {"h": out["h"] * 2, "aux": (out["aux"][0] * 0, out["aux"][1])}
        return out

    expected, seen = reference(model, x, edit=edit)
    assert_close(out, expected)
    assert_close(seen_after, seen[(("inner",), 0)]["h"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Aux:
    h: jax.Array
    aux: tuple


class DataclassOutput(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4, name="d")(x)
        return Aux(y, (y * 2, y * 3))


class TakesDict(nn.Module):
    @nn.compact
    def __call__(self, inputs):
        return nn.Dense(4, name="d")(inputs["a"]) + inputs["b"]


class DictAndDataclass(nn.Module):
    """A dict input, a mutable dataclass output, and a module called twice."""

    @nn.compact
    def __call__(self, x):
        o = DataclassOutput(name="inner")(x)
        h = TakesDict(name="takes")({"a": o.h + o.aux[0], "b": o.aux[1]})
        twice = DictOutput(name="twice")
        return twice(twice(h)["h"])["h"]


def test_writes_to_a_dict_input_and_dataclass_fields_reach_the_forward():
    """``.input["a"] = v``, ``.output.field = v`` and ``.output.field[0] = v`` each
    write the site (they were dropped before), as the hand-written edit does."""
    x = jax.random.normal(jax.random.key(2), (2, 3))
    module = DictAndDataclass()
    model = NNsight(module, module.init(jax.random.key(0), x))
    with model.trace(x):
        o = model.inner.output
        o.h = o.h * 2
        o.aux[0] = o.aux[0] * 0
        seen_h = model.inner.output.h.save()      # a later read sees the field writes
        model.takes.input["b"] = model.takes.input["b"] + 1
        out = model.output.save()

    def edit(next_fun, a, k, context):
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path == ("takes",):
            a = ({**a[0], "b": a[0]["b"] + 1},)
        out = next_fun(*a, **k)
        if context.method_name == "__call__" and path == ("inner",):
            out = Aux(out.h * 2, (out.aux[0] * 0, out.aux[1]))
        return out

    with nn.intercept_methods(edit):
        expected = module.apply(model.variables, x)
    assert_close(out, expected)
    assert_close(seen_h, reference(model, x)[1][(("inner",), 0)].h * 2)
    # two element writes on one read keep both (a tuple rebuilt from the read kept the last)
    with model.trace(x):
        o = model.inner.output
        o.aux[0] = o.aux[0] * 0
        o.aux[1] = o.aux[1] * 0
        pair = model.twice.output
        both = model.output.save()
    with model.trace(x):
        o = model.inner.output
        o.aux = (o.aux[0] * 0, o.aux[1] * 0)
        once = model.output.save()
    assert_close(both, once)
    # a dataclass read before a whole write is no longer the output, as a torch output
    # object replaced by a hook: its fields write nothing; the written object's still do
    with model.trace(x):
        o = model.inner.output
        model.inner.output = Aux(o.h * 2, o.aux)
        o.h = o.h * 0
        replaced = model.output.save()
    with model.trace(x):
        o = model.inner.output
        model.inner.output = o
        o.h = o.h * 2
        kept = model.output.save()

    def double_h(next_fun, a, k, context):
        out = next_fun(*a, **k)
        if context.method_name == "__call__" and tuple(context.module.path) == ("inner",):
            out = Aux(out.h * 2, out.aux)
        return out

    with nn.intercept_methods(double_h):
        doubled = module.apply(model.variables, x)
    assert_close(replaced, doubled)
    assert_close(kept, doubled)
    with pytest.raises(jnnsight.WriteError, match=r"test_edges.py:\d+: `model.takes.output.save\(\)`\n"
                       r"`model.inner.output` expects float32\[2, 4\][\s\S]*assignment of `.h`"):
        with model.trace(x):
            o = model.inner.output
            o.h = jnp.zeros(3)
            model.takes.output.save()


def test_an_element_write_goes_to_the_call_and_invoke_it_was_read_at():
    """A value read, then ``.next()`` (or another invoke): writing its element still
    edits the call (and rows) it came from."""
    x = jax.random.normal(jax.random.key(2), (2, 3))
    module = DictAndDataclass()
    model = NNsight(module, module.init(jax.random.key(0), x))
    with model.trace() as tracer:
        with tracer.invoke(x[:1]):
            first = model.twice.output
        with tracer.invoke(x[1:]):
            model.twice.next()
            first["h"] = first["h"] * 0              # row 0, first call
            model.twice.output["h"] = model.twice.output["h"] + 1   # row 1, second call
        with tracer.invoke():
            out = model.output.save()

    def edit(path, call, out):
        if path == ("twice",) and call == 0:
            return {**out, "h": out["h"].at[0].multiply(0)}
        if path == ("twice",) and call == 1:
            return {**out, "h": out["h"].at[1].add(1)}
        return out

    assert_close(out, reference(model, x, edit=edit)[0])


class ScalesDict(nn.Module):
    @nn.compact
    def __call__(self, inputs, scale):
        return nn.Dense(4, name="d")(inputs["a"]) * scale


class CallsScalesDict(nn.Module):
    @nn.compact
    def __call__(self, x):
        return ScalesDict(name="sd")({"a": x}, jnp.ones(()))


def test_an_element_write_keeps_writes_to_the_other_arguments_made_since_the_read():
    x = jax.random.normal(jax.random.key(2), (2, 3))
    module = CallsScalesDict()
    model = NNsight(module, module.init(jax.random.key(0), x))
    with model.trace(x):
        first = model.sd.input                        # read, then the other argument written
        (inputs, scale), kwargs = model.sd.inputs
        model.sd.inputs = ((inputs, scale * 3), kwargs)
        first["a"] = first["a"] * 2                   # keeps `scale * 3`
        out = model.output.save()
    d = model.variables["params"]["sd"]["d"]
    assert_close(out, ((2 * x) @ d["kernel"] + d["bias"]) * 3)


class Base(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="d")(x)


class Doubled(Base):
    def __call__(self, x):
        return super().__call__(x) * 2


class CallsSubclassTwice(nn.Module):
    @nn.compact
    def __call__(self, x):
        block = Doubled(name="block")
        return block(block(x))


def test_a_subclass_calling_super_call_is_one_call_with_one_output():
    """``super().__call__`` runs inside the module's call: ``.output`` is the
    subclass's (doubled) output and ``.next()`` reaches the second real call."""
    x = jax.random.normal(jax.random.key(2), (2, 3))
    module = CallsSubclassTwice()
    model = NNsight(module, module.init(jax.random.key(0), x))
    dense = model.variables["params"]["block"]["d"]
    first = 2 * (x @ dense["kernel"] + dense["bias"])
    second = 2 * (first @ dense["kernel"] + dense["bias"])
    with model.trace(x):
        one = model.block.output.save()
        two = model.block.next().output.save()
        model.block.output = two * 0 + 1
        out = model.output.save()
    assert_close(one, first)
    assert_close(two, second)
    assert_close(out, jnp.ones_like(second))


class Scale(nn.Module):
    scale: float

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="d")(x) * self.scale


class ConfiguredByArgument(nn.Module):
    @nn.compact
    def __call__(self, x, scale: float = 1.0):
        return Scale(scale, name="sc")(x)


def test_an_envoy_call_uses_the_module_as_this_forward_configured_it():
    x = jax.random.normal(jax.random.key(2), (2, 3))
    module = ConfiguredByArgument()
    model = NNsight(module, module.init(jax.random.key(0), x))
    dense = model.variables["params"]["sc"]["d"]
    plain = x @ dense["kernel"] + dense["bias"]
    for scale in (2.0, 5.0, 2.0):
        with model.trace(x, scale=scale):
            called = model.sc(x).save()
        assert_close(called, plain * scale)
    assert_close(model.sc(x), plain * 2.0)   # outside a block: the newest forward's


def test_writes_to_inputs_and_to_the_model_input(toy):
    model, tokens = toy
    other = (tokens + 3) % 32
    with model.trace(tokens):
        model.input = other
        logits = model.output.save()
    assert_close(logits, reference(model, other)[0])
    with model.trace(tokens):
        args, kwargs = model.h[1].mlp.inputs
        model.h[1].mlp.inputs = ((args[0] * 0,), kwargs)
        zeroed = model.output.save()

    def no_mlp_input(next_fun, a, k, context):
        if context.method_name == "__call__" and context.module.path == ("h_1", "mlp"):
            a = (a[0] * 0,)
        return next_fun(*a, **k)

    with nn.intercept_methods(no_mlp_input):
        expected = model.module.apply(model.variables, tokens)
    assert_close(zeroed, expected)


def test_names_set_by_a_trace_body_with_invokes_reach_the_function(toy):
    model, tokens = toy
    scale = 1.0
    with model.trace() as tracer:
        outs = []
        with tracer.invoke(tokens[:1]):
            model.h[0].output[0] = model.h[0].output[0] * scale
            outs.append(model.output.save())
        scale = 2.0
    assert scale == 2.0                     # Python order: the trace body set it last
    assert_close(outs[0], reference(model, tokens[:1])[0])


def test_global_and_nonlocal_names_set_in_a_block_reach_their_scopes(toy):
    """A function's ``global`` names (declared before or inside the block) and ``nonlocal`` ones."""
    model, tokens = toy
    expected = reference(model, tokens)[0]

    def declared_before():
        global SAVED_BEFORE
        with model.trace(tokens):
            SAVED_BEFORE = model.output.save()

    def declared_inside():
        with model.trace(tokens):
            global SAVED_INSIDE
            SAVED_INSIDE = model.output.save()

    def enclosing():
        saved = None

        def inner():
            nonlocal saved
            with model.trace(tokens):
                saved = model.output.save()
        inner()
        return saved

    declared_before()
    declared_inside()
    assert_close(SAVED_BEFORE, expected)  # noqa: F821  (set by the functions above)
    assert_close(SAVED_INSIDE, expected)  # noqa: F821
    assert_close(enclosing(), expected)


def test_a_line_tracer_keeps_tracing_the_caller_after_a_block(toy):
    model, tokens = toy
    seen = []

    def line_tracer(frame, event, arg):
        if frame.f_code is run.__code__ and event == "line":
            seen.append(frame.f_lineno - run.__code__.co_firstlineno)
        return line_tracer

    def run():
        with model.trace(tokens):
            h = model.output.save()
        after = h.shape
        return after

    previous = sys.gettrace()
    sys.settrace(line_tracer)
    try:
        run()
    finally:
        sys.settrace(previous)
    assert 3 in seen and 4 in seen          # the two lines after the block


LATER_CALLS: list[int] = []


class Counted(nn.Module):
    """Counts how often its forward is traced (discovery, each compile)."""

    @nn.compact
    def __call__(self, x):
        LATER_CALLS.append(1)
        return x * 2


class StopsEarly(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="first")(x)
        return Counted(name="later")(h)


def test_stop_keeps_the_rest_of_the_forward_out_of_the_program():
    x = jnp.ones((2, 3))
    module = StopsEarly()
    model = NNsight(module, module.init(jax.random.key(0), x))
    calls = LATER_CALLS
    calls.clear()
    with model.trace(x):
        full = model.output.save()          # discovery and the compile both trace `later`
    assert len(calls) == 2
    with model.trace(x) as tracer:
        h = model.first.output.save()
        tracer.stop()
    assert len(calls) == 2                  # the stopped program never reached `later`
    p = model.variables["params"]["first"]
    assert_close(h, x @ p["kernel"] + p["bias"])
    assert_close(full, h * 2)


def test_a_cache_next_to_a_skipped_module(toy):
    model, tokens = toy
    with model.trace(tokens) as tracer:
        model.h[1].skip((model.h[1].input,))
        cache = tracer.cache()
    _, seen = reference(model, tokens)
    assert "h.1.mlp" not in cache
    assert_close(cache["h.1"].output[0], seen[(("h_0",), 0)][0])


class SharesDense(nn.Module):
    shared: nn.Module

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="own")(self.shared(x)) + x


class OwnsShared(nn.Module):
    """Gives both blocks the module it owns: the blocks call ``shared``, its path is the parent's."""

    def setup(self):
        self.shared = nn.Dense(4)
        self.block_0 = SharesDense(self.shared)
        self.block_1 = SharesDense(self.shared)

    def __call__(self, x):
        return self.block_1(self.block_0(x))


def test_skipping_or_calling_a_block_that_uses_its_parents_module():
    x = jax.random.normal(jax.random.key(0), (2, 4))
    module = OwnsShared()
    model = NNsight(module, module.init(jax.random.key(1), x))
    params = model.variables["params"]

    def dense(p, h):
        return h @ p["kernel"] + p["bias"]

    def block(name, h):
        return dense(params[name]["own"], dense(params["shared"], h)) + h

    with model.trace(x):
        model.block_0.skip(model.block_0.input)       # the first call of `shared` is left out
        in_block_1 = model.shared.next().output.save()  # ... and still numbered
        out = model.output.save()
    assert_close(in_block_1, dense(params["shared"], x))
    assert_close(out, block("block_1", x))
    with model.trace(x):
        again = model.block_1(model.block_0.output).save()   # borrows `shared`'s parameters
    assert_close(again, block("block_1", block("block_0", x)))
    assert_close(model.block_0(x), block("block_0", x))
    chain = OwnsList()                               # borrowed as a tuple of modules
    chained = NNsight(chain, chain.init(jax.random.key(1), x))
    with chained.trace(x):
        out = chained.output.save()
    assert_close(chained.block(x), out)


class ChainsShared(nn.Module):
    shared: tuple

    @nn.compact
    def __call__(self, x):
        for dense in self.shared:
            x = dense(x)
        return x


class OwnsList(nn.Module):
    def setup(self):
        self.a = nn.Dense(4)
        self.b = nn.Dense(4)
        self.block = ChainsShared((self.a, self.b))

    def __call__(self, x):
        return self.block(x)


class NamedLikeSites(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="input")(x)
        h = nn.Dense(4, name="next")(h)
        return nn.Dense(4, name="output")(h)


class HoldsNamedLikeSites(nn.Module):
    @nn.compact
    def __call__(self, x):
        return NamedLikeSites(name="layer")(nn.Dense(4, name="trace")(x))


class Wraps(nn.Module):
    module: nn.Module

    def __call__(self, x):
        return self.module(x)


def test_submodules_named_like_envoy_attributes_are_reached_with_E_():
    """BERT-style ``output`` submodules: ``.output`` stays the site, ``.E_output`` the child."""
    x = jax.random.normal(jax.random.key(0), (2, 4))
    module = HoldsNamedLikeSites()
    model = NNsight(module, module.init(jax.random.key(1), x))
    with model.trace(x):
        model.layer.E_next.output = model.layer.E_next.output * 0
        inner = model.layer.E_output.input.save()
        first = model.E_trace.output.save()
        out = model.layer.output.save()

    def edit(path, call, out):
        return out * 0 if path == ("layer", "next") else out

    expected, seen = reference(model, x, edit=edit)
    assert_close(out, expected)
    assert_close(inner, seen[(("layer", "next"), 0)])
    assert_close(first, seen[(("trace",), 0)])
    assert "(E_output): Dense" in repr(model) and "E_output" in dir(model.layer)
    wrapper = Wraps(nn.Dense(4))                  # a field `module`, as wrappers name it
    wrapped = NNsight(wrapper, wrapper.init(jax.random.key(1), x))
    with wrapped.trace(x):
        inner = wrapped.E_module.output.save()
    assert_close(inner, wrapper.apply(wrapped.variables, x))
    assert "(E_module): Dense" in repr(wrapped)
    with pytest.raises(AttributeError, match="no submodule or parameter 'E_mlp'"):
        model.layer.E_mlp


class AutoEncoder(nn.Module):
    def setup(self):
        self.enc = nn.Dense(2)
        self.dec = nn.Dense(4)

    def encode(self, x):
        return self.enc(x)

    def __call__(self, x):
        return self.dec(self.encode(x))


def test_a_trace_with_method_runs_that_method_and_its_result_is_the_output():
    """``model.trace(x, method="encode")`` is flax's ``apply(..., method=)``: the root's
    sites are the method's call (it said the model "ran 0 times")."""
    x = jax.random.normal(jax.random.key(0), (2, 4))
    module = AutoEncoder()
    model = NNsight(module, module.init(jax.random.key(1), x))
    for method in ("encode", AutoEncoder.encode, lambda m, x: m.encode(x),
                   functools.partial(AutoEncoder.encode)):
        with model.trace(x, method=method):
            model.enc.output = model.enc.output * 2
            code = model.output.save()
        assert_close(code, 2 * module.apply(model.variables, x, method="encode"))
    with model.trace(x):                     # __call__ calls encode: one root call still
        whole = model.output.save()
    assert_close(whole, module.apply(model.variables, x))


def test_rebinding_a_saved_name_warns_at_the_save_line(toy):
    model, tokens = toy
    with pytest.warns(UserWarning, match=r"test_edges\.py:\d+.*\n2 saved value"):
        with model.trace(tokens):
            for i in range(3):
                h = model.h[i].output[0].save()
    assert_close(h, reference(model, tokens)[1][(("h_2",), 0)][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with model.trace(tokens):
            kept = [model.h[i].output[0].save() for i in range(3)]
    assert len(kept) == 3


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + jnp.tanh(nn.Dense(8, name="fc")(x)), None


class _Lifted(nn.Module):
    """Layers under nn.scan, then one under nn.remat, then a plain head."""

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = scan(name="layers")(x, None)
        x, _ = nn.remat(_Layer)(name="block")(x)
        return nn.Dense(2, name="head")(x)


def test_sites_inside_flax_lifted_transforms_are_refused_and_the_rest_works():
    """nn.scan and nn.remat bodies run in their own trace: a write there was dropped and a
    read leaked a tracer. They are refused at the user's line; sites outside still work."""
    module = _Lifted()
    x = jax.random.normal(jax.random.key(0), (2, 8))
    model = NNsight(module, module.init(jax.random.key(1), x))
    for site in ("layers.fc", "layers", "block", "block.fc"):
        for use in ("read", "write"):
            with pytest.raises(jnnsight.SiteError, match="inside a flax lifted transform.*model.output") as caught:
                with model.trace(x):
                    envoy = model
                    for name in site.split("."):
                        envoy = getattr(envoy, name)
                    if use == "read":
                        envoy.output.save()
                    else:
                        envoy.output = envoy.output
            assert "test_edges.py" in str(caught.value).splitlines()[0]
    with model.trace(x) as tracer:
        h = model.head.input.save()
        model.head.output = model.head.output * 2
        out = model.output.save()
        cache = tracer.cache()
    expected, _ = reference(model, x, edit=lambda p, c, o: o * 2 if p == ("head",) else o)
    assert_close(out, expected)
    head = model.variables["params"]["head"]
    assert_close(out, (h @ head["kernel"] + head["bias"]) * 2)
    assert set(cache) == {"model", "model.head"}


class _Normed(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.BatchNorm(use_running_average=not train, name="bn")(nn.Dense(4, name="fc")(x))


def test_collections_a_forward_updates_are_the_tracers_updates():
    """flax's mutable= (BatchNorm in training): the updated statistics follow the edits."""
    module = _Normed()
    x = jax.random.normal(jax.random.key(0), (8, 3))
    model = NNsight(module, module.init(jax.random.key(1), x))
    with model.trace(x, True, mutable=["batch_stats"]) as tracer:
        model.fc.output = model.fc.output * 2
        out = model.output.save()
    (expected, updates), _ = reference(model, x, True, mutable=["batch_stats"],
                                       edit=lambda p, c, o: o * 2 if p == ("fc",) else o)
    assert_close(out, expected)
    assert_close(tracer.updates, updates)
    with model.trace(x) as tracer:
        model.output.save()
    with pytest.raises(jnnsight.JnnsightError, match="mutable=") as caught:
        tracer.updates
    assert "test_edges.py" in str(caught.value).splitlines()[0]


class _Gate(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jax.nn.sigmoid(nn.Dense(8, name="proj")(x))  # its derivative reads its output


class _Gated(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="inp")(x)
        return nn.Dense(3, name="head")(_Gate(name="gate")(h) * h)


def _grad_at(model, x, path, loss):
    """d loss / d (the output of the module at ``path``), by ``jax.grad`` over an added zero."""
    shape = reference(model, x)[1][(path, 0)].shape

    def f(delta):
        return loss(reference(model, x, edit=lambda p, c, o: o + delta if p == path else o)[0])

    return jax.grad(f)(jnp.zeros(shape))


def test_module_output_gradients_are_not_refused_for_later_or_derivative_uses(toy):
    """Only an output that fed the module's other outputs is refused (attention weights,
    tested on GPT-2 and Llama): the block's own use of a child's output (the same array
    as its parent's) and JAX's derivative of a sigmoid reading its output are not."""
    model, tokens = toy
    with model.trace(tokens):
        mlp = model.h[0].mlp.output
        stat = model.h[0].mlp.c_proj.output.mean().save()  # the same array as mlp, used here
        with model.output.sum().backward():
            g = mlp.grad.save()
    assert_close(g, _grad_at(model, tokens, ("h_0", "mlp"), jnp.sum))

    x = jax.random.normal(jax.random.key(0), (2, 4))
    gated = NNsight(_Gated(), _Gated().init(jax.random.key(1), x))
    with gated.trace(x):
        h = gated.inp.output
        gate = gated.gate.output
        with gated.output[:, 0].sum().backward():
            h.grad.save()  # an upstream read: the forward runs under jax.vjp
            g = gate.grad.save()
    assert_close(g, _grad_at(gated, x, ("gate",), lambda out: out[:, 0].sum()))


def attend(q, k, v):
    probs = jax.nn.softmax(q @ k.swapaxes(-1, -2), axis=-1)
    return probs @ v, probs


class Attention(nn.Module):
    """Returns its weights after using them, computed in a ``wrap``-ped function."""

    wrap: Callable

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(4, name=name)(x) for name in "qkv")
        out, probs = self.wrap(attend)(q, k, v)
        return nn.Dense(4, name="o")(out), probs


class Attends(nn.Module):
    wrap: Callable

    @nn.compact
    def __call__(self, x):
        return Attention(self.wrap, name="attn")(x)[0]


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit, jax.checkpoint], ids=["plain", "jit", "checkpoint"])
def test_attention_weights_used_inside_a_jit_or_checkpoint_are_refused_too(wrap):
    """The weights' use inside the module is found through the calls that compute them
    (it gave zeros there); the output beside them keeps its gradient, as by hand."""
    x = jax.random.normal(jax.random.key(0), (1, 5, 4))
    module = Attends(wrap)
    model = NNsight(module, module.init(jax.random.key(1), x))
    with pytest.raises(jnnsight.JnnsightError, match=r"`probs = model.attn.output\[1\]`\n"
                       r"`.grad` of model.attn.output \(leaf 1\) would miss part"):
        with model.trace(x):
            probs = model.attn.output[1]
            with (model.output ** 2).sum().backward():
                probs.grad.save()
    with model.trace(x):
        out = model.attn.output[0]
        with (model.output ** 2).sum().backward():
            g = out.grad.save()
    out = Attention(wrap).apply({"params": model.variables["params"]["attn"]}, x)[0]
    np.testing.assert_allclose(g, 2 * out, rtol=1e-6)


class Encoder(nn.Module):
    """Returns its last hidden state twice: alone, and last in the list of all of them."""

    @nn.compact
    def __call__(self, x):
        h0 = nn.Dense(8, name="d0")(x)
        h1 = jnp.tanh(nn.Dense(8, name="d1")(h0))
        return h1, (h0, h1)


class Encodes(nn.Module):
    @nn.compact
    def __call__(self, x):
        last, _ = Encoder(name="enc")(x)
        return nn.Dense(3, name="head")(last)


def test_an_array_returned_twice_is_one_value_for_its_gradient():
    """``enc.output[1][1]`` is ``enc.output[0]``: its gradient counts the uses of either, as
    one torch tensor's does (it was zero: the head uses the other leaf), and an edit of it
    changes what flows upstream."""
    x = jax.random.normal(jax.random.key(0), (2, 8))
    module = Encodes()
    model = NNsight(module, module.init(jax.random.key(1), x))
    with model.trace(x):
        last, also_last = model.enc.output[0], model.enc.output[1][1]
        inner = model.enc.d0.output
        with (model.output ** 2).sum().backward():
            g_last, g_also = last.grad.save(), also_last.grad.save()
            also_last.grad = also_last.grad * 0
            g_inner = inner.grad.save()
    params = model.variables["params"]
    head = lambda h: nn.Dense(3).apply({"params": params["head"]}, h)  # noqa: E731
    h1 = Encoder().apply({"params": params["enc"]}, x)[0]
    expected = jax.grad(lambda h: (head(h) ** 2).sum())(h1)
    np.testing.assert_allclose(g_last, expected, rtol=1e-6)
    np.testing.assert_allclose(g_also, expected, rtol=1e-6)
    assert float(jnp.abs(expected).max()) > 0
    np.testing.assert_array_equal(g_inner, 0)


def test_a_value_saved_gathered_and_plainly_is_numpy_and_a_jax_array(toy):
    """``save(gather=True)`` on its own line (nnsight's habit) keeps the name, as numpy; the
    same value saved plainly stays a ``jax.Array`` (they were both numpy)."""
    model, tokens = toy
    with model.trace(tokens):
        h = model.h[0].output[0]
        h.save(gather=True)
        same = model.h[0].output[0].save()
    assert isinstance(h, np.ndarray) and isinstance(same, jax.Array)
    np.testing.assert_array_equal(h, np.asarray(same))


class Filled(nn.Module):
    """Returns ``jnp.full`` of its argument: the argument's Python type sets the dtype."""

    @nn.compact
    def __call__(self, x, value):
        return nn.Dense(2, name="d")(x), jnp.full((2,), value), 1.0 / jnp.asarray(value, jnp.float32)


def test_arguments_equal_in_python_but_of_other_types_get_their_own_program():
    """``2 == 2.0 == True`` and ``0.0 == -0.0`` in Python, and each makes another program;
    a plain ``module.apply`` is the reference."""
    x = jnp.ones((1, 3))
    variables = Filled().init(jax.random.key(0), x, 1)
    model = NNsight(Filled(), variables)
    for value in (2, 2.0, True, 1, 0.0, -0.0):
        with model.trace(x, value):
            out = model.output.save()
        _, full, inverse = Filled().apply(variables, x, value)
        assert out[1].dtype == full.dtype, value
        np.testing.assert_array_equal(out[1], full)
        np.testing.assert_array_equal(out[2], inverse)  # +inf for 0.0, -inf for -0.0


def test_a_weight_replaced_in_model_variables_is_used_outside_a_block_too(toy):
    """``model.variables`` is a plain dict: an array replaced in it is what a block's forward
    and an envoy called as a function use, and what a parameter read returns; the
    reference is flax's Dense on the new kernel."""
    module, tokens = toy[0].module, toy[1]
    model = NNsight(module, jax.tree_util.tree_map(lambda a: a, toy[0].variables))
    with model.trace(tokens):
        h = model.h[1].mlp.c_fc.output.save()
    proj = model.h[1].mlp.c_proj
    before = proj(jax.nn.gelu(h))
    dense = model.variables["params"]["h_1"]["mlp"]["c_proj"]
    dense["kernel"] = dense["kernel"] * 2 + 1
    expected = nn.Dense(16).apply({"params": dense}, jax.nn.gelu(h))
    with model.trace(tokens):
        in_block = model.h[1].mlp.c_proj.output.save()
    np.testing.assert_allclose(in_block, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(proj(jax.nn.gelu(h)), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(before, expected)
    assert proj.kernel is dense["kernel"]


def test_a_block_edited_on_disk_and_reloaded_runs_its_new_body(toy, tmp_path, monkeypatch):
    """``importlib.reload`` (IPython's ``%autoreload``) after editing a file: the block's
    body is read anew, not from the lines Python cached of the old file."""
    import importlib
    import os

    model, tokens = toy
    source = ("def run(model, tokens):\n"
              "    with model.trace(tokens):\n"
              "        model.h[0].output[0] = model.h[0].output[0] * {scale}\n"
              "        out = model.output.save()\n"
              "    return out\n")
    path = tmp_path / "edited_block.py"
    path.write_text(source.format(scale="2.0"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import edited_block

    def scaled(scale):
        with model.trace(tokens):
            model.h[0].output[0] = model.h[0].output[0] * scale
            out = model.output.save()
        return out

    np.testing.assert_allclose(edited_block.run(model, tokens), scaled(2.0), rtol=1e-6)
    path.write_text(source.format(scale="5.0"))
    stat = path.stat()  # a new modification time, however fast the file system
    os.utime(path, (stat.st_atime, stat.st_mtime + 2))
    importlib.invalidate_caches()
    edited_block = importlib.reload(edited_block)
    np.testing.assert_allclose(edited_block.run(model, tokens), scaled(5.0), rtol=1e-6)
    sys.modules.pop("edited_block", None)
