"""``with loss.backward():`` and ``.grad`` in a block, against torch autograd on the same
weights (forward hooks that retain the layers' output gradients, tensor hooks that edit them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_language_model
from jnnsight.errors import JnnsightError, SiteError, WriteError

torch = pytest.importorskip("torch")

IDS = np.array([[11, 12, 13, 14, 15, 16, 17]])
A, B = 42, 7


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradients")
    return {name: tiny_language_model(name, root / name) for name in ("gpt2", "llama")}


def layers(lm):
    return lm.transformer.h if "transformer" in dir(lm) else lm.model.layers


def torch_layers(tm):
    return tm.transformer.h if hasattr(tm, "transformer") else tm.model.layers


def torch_grads(tm, ids, target: int, scale_at: int | None = None, scale: float = 1.0) -> list[np.ndarray]:
    """d loss / d each layer's output in torch; optionally a tensor hook scales one layer's."""
    kept = []

    def keep(i):
        def hook(module, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            hidden.retain_grad()
            if i == scale_at:
                hidden.register_hook(lambda g: g * scale)
            kept.append(hidden)
        return hook

    handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(torch_layers(tm))]
    try:
        logits = tm(torch.tensor(ids)).logits
        (-torch.log_softmax(logits[0, -1], -1)[target]).backward()
    finally:
        for handle in handles:
            handle.remove()
    return [h.grad.numpy() for h in kept]


def close(a, b) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max()), np.abs(a - b).max()


def nll(logits, target):
    return -jax.nn.log_softmax(logits[0, -1])[target]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_grad_reads_equal_torch_autograd(models, name):
    tm, lm = models[name]
    with lm.trace(IDS):
        h0, h1 = layers(lm)[0].output[0], layers(lm)[1].output[0]
        loss = nll(lm.lm_head.output, A)
        with loss.backward():
            g0, g1 = h0.grad.save(), h1.grad.save()
    theirs = torch_grads(tm, IDS, A)
    close(g0, theirs[0])
    close(g1, theirs[1])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_gradient_edit_changes_what_flows_upstream_as_a_torch_tensor_hook(models, name):
    tm, lm = models[name]
    with lm.trace(IDS):
        h0, h1 = layers(lm)[0].output[0], layers(lm)[1].output[0]
        loss = nll(lm.lm_head.output, A)
        with loss.backward():
            before = h1.grad.save()
            h1.grad = h1.grad * 0.5
            after = h1.grad.save()            # a read after the write sees the new value
            g0 = h0.grad.save()
    theirs = torch_grads(tm, IDS, A, scale_at=1, scale=0.5)
    plain = torch_grads(tm, IDS, A)
    close(before, plain[1])
    close(after, 0.5 * plain[1])
    close(g0, theirs[0])
    assert np.abs(theirs[0] - plain[0]).max() > 1e-3  # the edit mattered upstream

    with lm.trace(IDS):
        h0, h1 = layers(lm)[0].output[0], layers(lm)[1].output[0]
        loss = nll(lm.lm_head.output, A)
        with loss.backward():
            h1.grad = jnp.zeros_like(h1.grad)
            zero = h0.grad.save()
    assert float(jnp.abs(zero).max()) == 0.0


def test_several_targets_and_invokes_each_get_their_own_gradient(models):
    tm, lm = models["llama"]
    other = np.array([[21, 22, 23, 24, 25, 26, 27]])
    with lm.trace() as tracer:
        with tracer.invoke(IDS):
            h = lm.model.layers[0].output[0]
            logits = lm.lm_head.output
            with nll(logits, A).backward():
                ga = h.grad.save()
            with nll(logits, B).backward():
                gb = h.grad.save()
        with tracer.invoke(other):
            h2 = lm.model.layers[0].output[0]
            with nll(lm.lm_head.output, A).backward():
                g2 = h2.grad.save()
    close(ga, torch_grads(tm, IDS, A)[0])
    close(gb, torch_grads(tm, IDS, B)[0])
    close(g2, torch_grads(tm, other, A)[0])


def test_gradients_in_a_block_inside_jax_jit_compile_once(models, compile_counter):
    tm, lm = models["llama"]

    @jax.jit
    def grads(params, ids):
        with lm.bind(params).trace(ids):
            h = lm.model.layers[0].output[0]
            with nll(lm.lm_head.output, A).backward():
                g = h.grad.save()
        return g

    close(grads(lm.variables, jnp.asarray(IDS)), torch_grads(tm, IDS, A)[0])
    compile_counter.clear()
    other = np.array([[31, 32, 33, 34, 35, 36, 37]])
    close(grads(lm.variables, jnp.asarray(other)), torch_grads(tm, other, A)[0])
    assert compile_counter == []


def test_bad_gradient_code_gets_clear_errors(models):
    _, lm = models["llama"]
    with pytest.raises(SiteError, match="inside a `with loss.backward"):
        with lm.trace(IDS):
            lm.model.layers[0].output[0].grad.save()
    with pytest.raises(SiteError, match="read from a module"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0] * 2
            with nll(lm.lm_head.output, A).backward():
                h.grad.save()
    with pytest.raises(WriteError, match="scalar"):
        with lm.trace(IDS):
            with lm.lm_head.output.sum(-1).backward():
                pass
    with pytest.raises(WriteError, match="the gradient here is"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            with nll(lm.lm_head.output, A).backward():
                h.grad = jnp.zeros(3)
    with pytest.raises(JnnsightError, match="one `backward\\(\\)` target"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            logits = lm.lm_head.output
            with nll(logits, A).backward():
                h.grad = h.grad * 2
            with nll(logits, B).backward():
                h.grad.save()
    with pytest.raises(JnnsightError, match="runs after it"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            later = lm.model.layers[1].output[0]
            with nll(lm.lm_head.output, A).backward():
                h.grad = h.grad * later
