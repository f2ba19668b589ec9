"""What a block reads, writes and saves equals a hand-written interceptor's forward."""

from __future__ import annotations

import runpy
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnnsight
from jnnsight import NNsight, UnsavedValueError

from conftest import assert_close, reference


def test_saved_block_outputs_equal_the_plain_forward(toy):
    model, tokens = toy
    with model.trace(tokens):
        hidden = [model.h[i].output[0].save() for i in range(3)]
        logits = model.output.save()
    out, seen = reference(model, tokens)
    assert isinstance(logits, jax.Array) and isinstance(hidden[0], jax.Array)
    assert_close(logits, out)
    for i in range(3):
        assert_close(hidden[i], seen[((f"h_{i}",), 0)][0])


def test_tuple_element_write_equals_hand_written_edit(toy):
    model, tokens = toy
    with model.trace(tokens):
        model.h[1].output[0] = model.h[1].output[0] * 0.5
        logits = model.output.save()

    def edit(path, call, out):
        return (out[0] * 0.5,) if path == ("h_1",) else out

    assert_close(logits, reference(model, tokens, edit=edit)[0])


def test_noise_edit_on_mlp_output_and_read_after_write(toy):
    model, tokens = toy
    noise = jax.random.normal(jax.random.key(3), (2, 6, 16)) * 0.1
    with model.trace(tokens):
        before = model.h[-1].mlp.output.save()
        model.h[-1].mlp.output = before + noise
        after = model.h[-1].mlp.output.save()
        logits = model.output.save()

    def edit(path, call, out):
        return out + noise if path == ("h_2", "mlp") else out

    out, seen = reference(model, tokens, edit=edit)
    assert_close(after, before + noise)
    assert_close(logits, out)
    assert_close(before, reference(model, tokens)[1][(("h_2", "mlp"), 0)])


def test_a_concrete_array_written_to_a_site_reads_back_as_a_value_of_the_block(toy):
    """Writing a value saved by an earlier trace (or ``jnp.zeros``) and reading the site
    again: the read can be saved and computed with, as any site value."""
    model, tokens = toy
    with model.trace(tokens):
        earlier = model.h[0].mlp.output.save()
    for value in (earlier, jnp.zeros_like(earlier), np.ones(earlier.shape, np.float32)):
        with model.trace(tokens):
            model.h[1].mlp.output = value
            again = model.h[1].mlp.output.save()
            doubled = (model.h[1].mlp.output * 2).save()
            logits = model.output.save()

        def edit(path, call, out):
            return jnp.asarray(value) if path == ("h_1", "mlp") else out

        assert_close(again, value)
        assert_close(doubled, 2 * np.asarray(value))
        assert_close(logits, reference(model, tokens, edit=edit)[0])

    @jax.jit
    def patched(patch):  # a tracer of the user's jax.jit around the block, written and read
        with model.trace(tokens):
            model.h[1].mlp.output = patch
            back = model.h[1].mlp.output.save()
            logits = model.output.save()
        return back, logits

    back, logits = patched(earlier + 1)
    assert_close(back, earlier + 1)
    patch = lambda path, call, out: earlier + 1 if path == ("h_1", "mlp") else out  # noqa: E731
    assert_close(logits, reference(model, tokens, edit=patch)[0])


def test_input_read_and_write(toy):
    model, tokens = toy
    with model.trace(tokens):
        x = model.h[0].mlp.input.save()
        args, kwargs = model.h[0].mlp.inputs
        args0 = args[0].save()
        model.h[1].mlp.input = model.h[1].mlp.input * 2
        logits = model.output.save()
    _, seen = reference(model, tokens)
    assert_close(x, seen[(("h_0", "ln_2"), 0)])
    assert_close(args0, x)
    assert kwargs == {}

    def double_input(next_fun, a, k, context):
        if context.method_name == "__call__" and context.module.path == ("h_1", "mlp"):
            a = (a[0] * 2,)
        return next_fun(*a, **k)

    with nn.intercept_methods(double_input):
        expected = model.module.apply(model.variables, tokens)
    assert_close(logits, expected)


def test_reads_in_any_order_the_data_allows(toy):
    model, tokens = toy
    with model.trace(tokens):
        late = model.h[2].output[0].save()          # read a late site first
        early = model.h[0].output[0]
        model.h[2].output[0] = early * 1.0 + 0.0    # write a late site from an early one
        logits = model.output.save()
    _, seen = reference(model, tokens)
    h0 = seen[(("h_0",), 0)][0]
    expected, _ = reference(model, tokens, edit=lambda p, c, o: (h0,) if p == ("h_2",) else o)
    assert_close(logits, expected)
    assert_close(late, seen[(("h_2",), 0)][0])


def test_jnp_functions_and_sums_on_values(toy):
    model, tokens = toy
    with model.trace(tokens):
        h = model.h[-1].output[0].save()
        total = jnp.sum(h).save()
        edited = (h + total).save()
        stats = jnnsight.save({"mean": h.mean(), "tanh": jnp.tanh(h)})
    expected = reference(model, tokens)[1][(("h_2",), 0)][0]
    assert_close(h, expected)
    assert_close(total, jnp.sum(expected), tol=1e-4)
    assert_close(edited, expected + jnp.sum(expected), tol=1e-4)
    assert_close(stats["tanh"], jnp.tanh(expected))
    assert_close(stats["mean"], expected.mean())


def test_saves_of_tuples_inputs_and_attributes(toy):
    model, tokens = toy

    class Holder:
        pass

    holder = Holder()
    with model.trace(tokens):
        block = model.h[0].output.save()
        inputs = model.h[1].inputs.save()
        holder.h = model.h[2].output[0].save()
    _, seen = reference(model, tokens)
    assert type(block) is tuple and len(block) == 1
    assert_close(block[0], seen[(("h_0",), 0)][0])
    (args, kwargs) = inputs
    assert kwargs == {}
    assert_close(args[0], seen[(("h_0",), 0)][0])
    assert_close(holder.h, seen[(("h_2",), 0)][0])


def test_invokes_see_their_rows_and_equal_solo_runs(toy):
    model, tokens = toy
    a, b = tokens[:1], tokens[1:]
    with model.trace() as tracer:
        with tracer.invoke(a):
            ha = model.h[1].output[0].save()
            model.h[1].output[0] = model.h[1].output[0] * 3
            la = model.output.save()
        with tracer.invoke(b):
            hb = model.h[1].output[0].save()
            lb = model.output.save()
        with tracer.invoke():
            everything = model.output.save()
    assert ha.shape == (1, 6, 16) and hb.shape == (1, 6, 16)
    with model.trace(a):
        model.h[1].output[0] = model.h[1].output[0] * 3
        solo_a = model.output.save()
    with model.trace(b):
        solo_b = model.output.save()
    assert_close(la, solo_a)
    assert_close(lb, solo_b)
    assert_close(everything, jnp.concatenate([solo_a, solo_b]))


def test_cross_invoke_embedding_transfer(toy):
    model, tokens = toy
    a, b = tokens[:1], tokens[1:]
    with model.trace() as tracer:
        with tracer.invoke(a):
            embeddings = model.wte.output
        with tracer.invoke(b):
            model.wte.output = embeddings
            patched = model.output.save()
    with model.trace(a):
        expected = model.output.save()
    assert_close(patched, expected)


def test_invokes_in_a_loop_keep_their_loop_variables(toy):
    model, tokens = toy
    scales = [1.0, 2.0]
    outs = []
    with model.trace() as tracer:
        for i, scale in enumerate(scales):
            with tracer.invoke(tokens[i : i + 1]):
                model.h[0].output[0] = model.h[0].output[0] * scale
                outs.append(model.output.save())
    for i, scale in enumerate(scales):
        with model.trace(tokens[i : i + 1]):
            model.h[0].output[0] = model.h[0].output[0] * scale
            solo = model.output.save()
        assert_close(outs[i], solo)


def test_body_side_effects_happen_once_and_outer_lists_get_arrays(toy):
    model, tokens = toy
    calls = []
    shapes = []
    for repeat in range(3):
        saved = []
        with model.trace(tokens):
            calls.append(repeat)
            shapes.append(model.h[0].output[0].shape)
            saved.append(model.h[0].output[0].save())
        assert isinstance(saved[0], jax.Array)
    assert calls == [0, 1, 2]
    assert shapes == [(2, 6, 16)] * 3


def test_unsaved_values_do_not_leave_the_block(toy):
    model, tokens = toy
    with model.trace(tokens):
        kept = model.h[0].output[0].save()
        dropped = model.h[1].output[0] * 2
    assert isinstance(kept, jax.Array)
    with pytest.raises(UnsavedValueError, match="dropped"):
        dropped + 1


def test_saves_reach_module_level_variables(tmp_path):
    script = tmp_path / "block_at_module_level.py"
    script.write_text(textwrap.dedent("""
        from jnnsight.toy import toy_model
        model, tokens = toy_model(layers=1, width=8, heads=2, vocab=16, length=3)
        with model.trace(tokens):
            hidden = model.h[0].output[0].save()
            logits = model.output.save()
    """))
    names = runpy.run_path(str(script))
    assert isinstance(names["hidden"], jax.Array) and names["hidden"].shape == (1, 3, 8)
    assert_close(names["logits"], names["model"].module.apply(names["model"].variables, names["tokens"]))


def test_scan_gives_shapes_without_running(toy):
    model, tokens = toy
    with model.scan(tokens):
        h = model.h[0].mlp.c_fc.output.save()
        width = model.h[0].mlp.c_fc.output.shape[-1]
    assert h == jax.ShapeDtypeStruct((2, 6, 64), jnp.float32)
    assert width == 64


def test_calling_an_envoy_applies_the_submodule_with_model_parameters(toy):
    model, tokens = toy
    with model.trace(tokens):
        h = model.h[0].output[0]
        lens = model.lm_head(model.ln_f(h)).save()
        kernel = model.lm_head.kernel.save()
    _, seen = reference(model, tokens)
    params = model.variables["params"]
    normed = nn.LayerNorm().apply({"params": params["ln_f"]}, seen[(("h_0",), 0)][0])
    assert_close(lens, normed @ params["lm_head"]["kernel"])
    assert_close(kernel, params["lm_head"]["kernel"])


def test_stop_ends_the_block_and_the_forward(toy):
    model, tokens = toy
    ran = []
    with model.trace(tokens) as tracer:
        h = model.h[0].output[0].save()
        tracer.stop()
        ran.append("after stop")  # noqa: unreachable by design
    assert ran == []
    assert_close(h, reference(model, tokens)[1][(("h_0",), 0)][0])


def test_skip_replaces_the_module_call(toy):
    model, tokens = toy
    with model.trace(tokens):
        model.h[1].skip((model.h[1].input,))
        logits = model.output.save()
        skipped = model.h[1].output[0].save()
    _, seen = reference(model, tokens)

    def identity_block(path, call, out):
        return (seen[(("h_0",), 0)][0],) if path == ("h_1",) else out

    assert_close(logits, reference(model, tokens, edit=identity_block)[0])
    assert_close(skipped, seen[(("h_0",), 0)][0])


def test_cache_holds_every_output_after_edits_keyed_as_nnsight(toy):
    model, tokens = toy
    with model.trace(tokens) as tracer:
        model.h[0].mlp.output = model.h[0].mlp.output * 0
        cache = tracer.cache(include_inputs=True)

    def edit(path, call, out):
        return out * 0 if path == ("h_0", "mlp") else out

    _, seen = reference(model, tokens, edit=edit)
    nnsight_key = {p: ".".join(["model", *(q.replace("_", ".") if q.startswith("h_") else q for q in p)])
                   for p, _ in seen}
    assert set(cache) == set(nnsight_key.values())
    for (path, call), value in seen.items():
        assert_close(cache[nnsight_key[path]].output, value)
    view = cache["model.h.0.mlp"]
    for same in (cache[model.h[0].mlp], cache["h_0.mlp"], cache["h.0.mlp"], cache["h[0].mlp"],
                 cache.model.h[0].mlp, cache.h[0].mlp, cache.model.h[-3].mlp):
        assert same.output is view.output
    assert len(cache.h) == 3 and [v.output for v in cache.h][1] is cache["h.1"].output
    assert cache["model"].output is cache[""].output  # the root: the model's own output
    args, kwargs = cache.h[1].inputs
    assert_close(args[0], seen[(("h_0",), 0)][0])
    assert cache.h[1].input is args[0]
    assert "h.1" in cache and "h.7" not in cache and len(view) == 1
    assert cache.h[0].keys() == [k for k in cache if k.startswith("model.h.0")]
    with pytest.raises(KeyError, match="holds no module 'model.h.0.mpl'. Did you mean 'model.h.0.mlp'"):
        cache["h.0.mpl"]

    # modules=, as nnsight's: only those outputs are kept, inputs only where asked
    with model.trace(tokens) as tracer:
        model.h[0].mlp.output = model.h[0].mlp.output * 0
        some = tracer.cache(modules=[model.h[0].mlp, "h.1", "model.h.2"])
    assert set(some) == {"model.h.0.mlp", "model.h.1", "model.h.2"}
    assert_close(some["h.0.mlp"].output, cache["h.0.mlp"].output)
    with pytest.raises(KeyError, match="include_inputs=True"):
        some.h[1].inputs
    with pytest.raises(KeyError, match="holds no module 'model.h.0.attn'"):
        some.h[0].attn.output
    with pytest.raises(jnnsight.SiteError, match="no module 'model.h.0.mpl'.*Did you mean 'model.h.0.mlp'"):
        with model.trace(tokens) as tracer:
            tracer.cache(modules=["h.0.mpl"])
    for read in (lambda c: c["h.0.mlp"], lambda c: c.h[0].mlp.output):
        with pytest.raises(jnnsight.SiteError, match=r"test_trace.py:\d+:[\s\S]*the cache is filled "
                           "when the trace block ends: read it after the `with` block"):
            with model.trace(tokens) as tracer:
                read(tracer.cache())


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(4, name="shared")
        return dense(jnp.tanh(dense(x)))


def test_next_addresses_the_second_call_of_a_module():
    x = jnp.ones((2, 4))
    module = Shared()
    model = NNsight(module, module.init(jax.random.key(0), x))
    with model.trace(x):
        first = model.shared.output.save()
        model.shared.next().output = model.shared.output * 0 + 1
        second = model.shared.output.save()
        out = model.output.save()
    params = model.variables["params"]["shared"]
    expected_first = x @ params["kernel"] + params["bias"]
    assert_close(first, expected_first)
    assert_close(second, jnp.ones((2, 4)))
    assert_close(out, jnp.ones((2, 4)))


def test_print_shows_the_module_tree(toy):
    model, _ = toy
    text = repr(model)
    for name in ["(wte)", "(h[0-2]): 3 x Block", "(c_attn)", "(lm_head)", "kernel=[16, 32]"]:
        assert name in text
    assert len(model.h) == 3
    assert model.h[-1] is model.h_2
    assert model.h[1:][0] is model.h_1  # a slice is a list of its own, as in nnsight


class Widening(nn.Module):
    def setup(self):
        self.h = [nn.Dense(4), nn.Dense(4), nn.Dense(7)]

    def __call__(self, x):
        for dense in self.h:
            x = dense(x)
        return x


def test_print_groups_only_layers_that_are_alike():
    """``h[2]`` has other shapes: it gets its own line (it was drawn as ``3 x`` the first)."""
    module = Widening()
    model = NNsight(module, module.init(jax.random.key(1), jnp.ones((1, 4))))
    assert "(h[0-1]): 2 x Dense(bias=[4], kernel=[4, 4])\n  (h[2]): Dense(bias=[7], kernel=[4, 7])" in repr(model)


class HoldsSequential(nn.Module):
    def setup(self):
        self.seq = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(4)])

    def __call__(self, x):
        return self.seq(x)


def test_a_sequential_lists_its_modules_by_flax_number():
    """Flax numbers ``[Dense, relu, Dense]`` as ``layers_0`` and ``layers_2``: both are
    ``seq.layers[...]`` by that number, and the error for ``[1]`` says why."""
    x = jax.random.normal(jax.random.key(0), (2, 4))
    module = HoldsSequential()
    model = NNsight(module, module.init(jax.random.key(1), x))
    with model.trace(x):
        model.seq.layers[0].output = model.seq.layers[0].output * -1
        last = model.seq.layers[2].input.save()
    assert "(layers[0,2]): 2 x Dense" in repr(model)
    assert model.seq.layers[-1] is model.seq.layers_2 and len(model.seq.layers) == 2
    p = model.variables["params"]["seq"]["layers_0"]
    assert_close(last, jax.nn.relu(-(x @ p["kernel"] + p["bias"])))
    with pytest.raises(IndexError, match=r"no module here is numbered 1: they are \[0, 2\]"):
        model.seq.layers[1]


def test_outside_array_edits_match_numpy(toy):
    model, tokens = toy
    vec = np.linspace(-1, 1, 16).astype(np.float32)
    with model.trace(tokens):
        model.h[2].output[0] = model.h[2].output[0].at[:, -1].set(vec)
        logits = model.output.save()

    def edit(path, call, out):
        return (out[0].at[:, -1].set(vec),) if path == ("h_2",) else out

    assert_close(logits, reference(model, tokens, edit=edit)[0])


def test_sites_inside_a_skipped_module_are_an_error_before_running(toy):
    model, tokens = toy
    with pytest.raises(jnnsight.SiteError, match="is skipped"):
        with model.trace(tokens):
            model.h[1].skip((model.h[1].input,))
            inner = model.h[1].mlp.output.save()


def test_a_block_in_an_ipython_cell_reads_its_source_from_the_cell():
    interactive = pytest.importorskip("IPython.core.interactiveshell")
    shell = interactive.InteractiveShell.instance()
    setup = shell.run_cell(
        "from jnnsight.toy import toy_model\n"
        "model, tokens = toy_model(layers=1, width=8, heads=2, vocab=16, length=3)\n"
    )
    cell = shell.run_cell(
        "with model.trace(tokens):\n"
        "    hidden = model.h[0].output[0].save()\n"
        "    model.h[0].output[0] = hidden * 0\n"
        "    logits = model.output.save()\n"
    )
    assert setup.success and cell.success, cell.error_in_exec
    names = shell.user_ns
    model, tokens = names["model"], names["tokens"]
    expected, seen = reference(model, tokens, edit=lambda p, c, o: (o[0] * 0,) if p == ("h_0",) else o)
    assert_close(names["logits"], expected)
    assert_close(names["hidden"], reference(model, tokens)[1][(("h_0",), 0)][0])


def test_a_block_whose_body_does_nothing_runs(toy):
    model, tokens = toy
    with model.trace(tokens):
        pass
    with model.trace(tokens):
        """A docstring first: the body starts at the next line."""
        logits = model.output.save()
    assert_close(logits, reference(model, tokens)[0])
