"""A block is a pure function: it works inside jax.jit, jax.grad and jax.vmap,
and the function form (``model.intervene``) is the same engine without ``with``."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, reference
from jnnsight import JnnsightError


def _steered(model, tokens, vec, variables=None):
    """Hand-written reference: add ``vec`` to block 1's hidden state."""

    def edit(path, call, out):
        return (out[0] + vec,) if path == ("h_1",) else out

    return reference(model, tokens, edit=edit, variables=variables)[0]


def test_block_inside_jit_equals_eager_reference(toy):
    model, tokens = toy

    @jax.jit
    def run(tokens, vec):
        with model.trace(tokens):
            model.h[1].output[0] = model.h[1].output[0] + vec
            logits = model.output.save()
        return logits

    vec = jnp.linspace(0, 1, 16)
    assert_close(run(tokens, vec), _steered(model, tokens, vec))
    assert_close(run(tokens, -vec), _steered(model, tokens, -vec))


def test_grad_with_respect_to_an_outside_array_used_in_an_edit(toy):
    model, tokens = toy

    def loss(vec):
        with model.trace(tokens):
            model.h[1].output[0] = model.h[1].output[0] + vec
            logits = model.output.save()
        return jnp.mean(logits[:, -1] ** 2)

    def reference_loss(vec):
        return jnp.mean(_steered(model, tokens, vec)[:, -1] ** 2)

    vec = jnp.full((16,), 0.3)
    assert_close(jax.grad(loss)(vec), jax.grad(reference_loss)(vec), tol=1e-5)
    assert_close(jax.jit(jax.grad(loss))(vec), jax.grad(reference_loss)(vec), tol=1e-5)


def test_vmap_over_steering_vectors_equals_a_loop(toy):
    model, tokens = toy

    def run(vec):
        with model.trace(tokens):
            model.h[1].output[0] = model.h[1].output[0] + vec
            logits = model.output.save()
        return logits

    vecs = jax.random.normal(jax.random.key(0), (3, 16))
    batched = jax.vmap(run)(vecs)
    for i in range(3):
        assert_close(batched[i], _steered(model, tokens, vecs[i]))


def test_intervene_is_a_pure_function_of_variables_inputs_and_arguments(toy):
    model, tokens = toy

    def body(vec):
        model.h[1].output[0] = model.h[1].output[0] + vec
        return {"h2": model.h[2].output[0], "logits": model.output}

    fn = jax.jit(model.intervene(body))
    vec = jnp.ones(16)
    out, saves = fn(model.variables, tokens, vec)
    expected = _steered(model, tokens, vec)
    assert_close(out, expected)
    assert_close(saves["logits"], expected)

    # New parameters of the same shapes: the function uses them, not the model's.
    doubled = jax.tree_util.tree_map(lambda p: p * 1.5, model.variables)
    out2, _ = fn(doubled, tokens, vec)
    assert_close(out2, _steered(model, tokens, vec, variables=doubled), tol=1e-4)
    assert float(jnp.max(jnp.abs(out2 - out))) > 1e-3

    # Gradient with respect to the steering vector, through the function form.
    grad = jax.grad(lambda v: jnp.sum(fn(model.variables, tokens, v)[0][:, -1, 0]))(vec)
    ref = jax.grad(lambda v: jnp.sum(_steered(model, tokens, v)[:, -1, 0]))(vec)
    assert_close(grad, ref)


def test_two_threads_tracing_one_model_get_their_own_results(toy):
    model, tokens = toy
    vecs = {name: jnp.full((16,), scale) for name, scale in (("a", 0.5), ("b", -2.0))}
    results: dict[str, list] = {"a": [], "b": []}
    errors: list[BaseException] = []
    start = threading.Barrier(len(vecs))  # both threads capture, discover and compile at once

    def worker(name):
        try:
            start.wait()
            for _ in range(8):
                with model.trace(tokens):
                    model.h[1].output[0] = model.h[1].output[0] + vecs[name]
                    h = model.h[1].output[0].save()
                    logits = model.output.save()
                results[name].append((h, logits))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in vecs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, vec in vecs.items():
        expected = _steered(model, tokens, vec)
        assert len(results[name]) == 8
        hidden = reference(model, tokens, edit=lambda p, c, o: (o[0] + vec,) if p == ("h_1",) else o)[1]
        for h, logits in results[name]:
            assert_close(logits, expected)
            assert_close(h, hidden[(("h_1",), 0)][0])


def test_repeating_a_block_with_new_values_of_the_same_shapes_does_not_compile(toy, compile_counter):
    model, tokens = toy

    def run(tokens, vec):
        with model.trace(tokens):
            model.h[1].output[0] = model.h[1].output[0] + vec
            logits = model.output.save()
        return logits

    vec = np.ones(16, np.float32)
    other_tokens = (tokens + 1) % 32
    expected = {s: _steered(model, other_tokens, vec * s) for s in (2.0, 3.0, 4.0)}
    run(tokens, vec)
    compiled = len(compile_counter)
    results = {s: run(other_tokens, vec * s) for s in expected}
    assert len(compile_counter) == compiled
    for scale, logits in results.items():
        # Outside arrays are arguments: a new value changes the result, not the program.
        assert_close(logits, expected[scale])

    # Another program (a write at another site) compiles once, then is cached too.
    def other(vec):
        with model.trace(tokens):
            model.h[0].output[0] = model.h[0].output[0] + vec
            logits = model.output.save()
        return logits

    other(vec)
    after_first = len(compile_counter)
    assert after_first > compiled
    other(vec * 5)
    assert len(compile_counter) == after_first


def test_jax_export_with_a_symbolic_length_and_a_clear_error_for_a_symbolic_batch(toy):
    model, tokens = toy
    steer = jnp.linspace(-1.0, 1.0, 16)

    def steered(vec, ids):
        with model.trace(ids):
            model.h[0].output[0] = model.h[0].output[0] + vec
            out = model.output.save()
        return out

    length, = jax.export.symbolic_shape("length")
    exported = jax.export.export(jax.jit(steered))(
        steer, jax.ShapeDtypeStruct((tokens.shape[0], length), tokens.dtype))
    edit = lambda p, c, o: (o[0] + steer, *o[1:]) if p == ("h_0",) else o  # noqa: E731
    for ids in (tokens, tokens[:, :3]):
        assert_close(exported.call(steer, ids), reference(model, ids, edit=edit)[0])
    batch, = jax.export.symbolic_shape("batch")
    with pytest.raises(JnnsightError, match="batch size is the symbol batch") as caught:
        jax.export.export(jax.jit(steered))(
            steer, jax.ShapeDtypeStruct((batch, tokens.shape[1]), tokens.dtype))
    assert "test_transforms.py" in str(caught.value).splitlines()[0]
