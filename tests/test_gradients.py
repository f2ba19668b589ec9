"""``with loss.backward():`` and ``.grad`` in a block, against torch autograd on the same
weights (forward hooks that retain the layers' output gradients, tensor hooks that edit them)."""

from __future__ import annotations

from typing import Any, Callable

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


def hidden_of(out):
    """A torch decoder layer's hidden state (transformers 5 returns the tensor alone)."""
    return out[0] if isinstance(out, tuple) else out


def torch_grads(tm, ids, target: int, scale_at: int | None = None,
                scale: float | Callable[[Any], Any] = 1.0) -> list[np.ndarray]:
    """d loss / d each layer's output in torch; optionally a tensor hook scales one layer's
    gradient by ``scale``, a number or a function of that layer's (detached) output."""
    kept = []

    def keep(i):
        def hook(module, args, out):
            hidden = hidden_of(out)
            hidden.retain_grad()
            if i == scale_at:
                factor = scale(hidden.detach().clone()) if callable(scale) else scale
                hidden.register_hook(lambda g: g * factor)
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
    with pytest.raises(WriteError, match="the gradient here is.*Index or reshape"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            with nll(lm.lm_head.output, A).backward():
                h.grad = jnp.zeros(3)
    with pytest.raises(WriteError, match=r"the gradient here is.*astype\(jnp.float32\)"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            with nll(lm.lm_head.output, A).backward():
                h.grad = h.grad.astype(jnp.bfloat16)
    with pytest.raises(JnnsightError, match=r"test_gradients.py:\d+:[\s\S]*one `backward\(\)` target"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            logits = lm.lm_head.output
            with nll(logits, A).backward():
                h.grad = h.grad * 2
            with nll(logits, B).backward():
                h.grad.save()
    with pytest.raises(JnnsightError, match=r"test_gradients.py:\d+: `h.grad = h.grad \* later`\n"
                       r"this gradient edit of model.model.layers\[0\].output uses "
                       r"model.model.layers\[1\].output, which the forward computes later"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            later = lm.model.layers[1].output[0]
            with nll(lm.lm_head.output, A).backward():
                h.grad = h.grad * later
    with pytest.raises(JnnsightError, match=r"test_gradients.py:\d+: `with penalty.backward\(\):`\n"
                       r"`backward\(\)` target #1 is computed from a `.grad` \(a gradient penalty"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            logits = lm.lm_head.output
            with nll(logits, A).backward():
                penalty = (h.grad ** 2).sum() + logits.sum()  # uses module values too
                with penalty.backward():
                    h.grad.save()
    with pytest.raises(SiteError, match=r"test_gradients.py:\d+:[\s\S]*`.grad` of a parameter.*jax.grad"):
        with lm.trace(IDS):
            with nll(lm.lm_head.output, A).backward():
                lm.model.layers[0].mlp.up_proj.weight.grad.save()
    with pytest.raises(WriteError, match=r"test_gradients.py:\d+:[\s\S]*`.grad = None`.*zeros_like"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            with nll(lm.lm_head.output, A).backward():
                h.grad = None
    with pytest.raises(WriteError, match=r"test_gradients.py:\d+:[\s\S]*needs `g` of the value's shape \[1, 7, 101\]"):
        with lm.trace(IDS):
            with lm.lm_head.output.backward(gradient=jnp.ones(3)):
                pass
    with pytest.raises(JnnsightError, match=r"test_gradients.py:\d+:[\s\S]*depends on no module value"):
        with lm.trace(IDS):
            with jnp.float32(1.0).backward():
                pass
    outside = jnp.ones(3)
    for constant in (lambda: (outside * 2).sum(), lambda: lm.lm_head.weight.sum()):
        with pytest.raises(JnnsightError, match="depends on no module value"):
            with lm.trace(IDS):
                h = lm.model.layers[0].output[0]
                with constant().backward():
                    h.grad.save()
    with pytest.raises(JnnsightError, match=r"test_gradients.py:\d+:[\s\S]*not the gradient of another"):
        with lm.trace(IDS):
            h0 = lm.model.layers[0].output[0]
            h1 = lm.model.layers[1].output[0]
            with nll(lm.lm_head.output, A).backward():
                h0.grad = h0.grad + h1.grad
    with lm.trace(IDS):  # nnsight's retain_graph is accepted (there is no graph to keep)
        h = lm.model.layers[0].output[0]
        with nll(lm.lm_head.output, A).backward(retain_graph=True):
            g = h.grad.save()
        hidden = h.save()
    assert g.shape == hidden.shape
    with pytest.raises(JnnsightError, match=r"test_gradients.py:\d+:[\s\S]*does nothing by itself"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            nll(lm.lm_head.output, A).backward()  # nnsight 0.4's spelling: no block
    with pytest.raises(JnnsightError, match="uses a gradient"):
        with lm.trace(IDS):
            h = lm.model.layers[0].output[0]
            with nll(lm.lm_head.output, A).backward():
                lm.model.layers[1].output[0] = h.grad
    with pytest.raises(JnnsightError, match=r"test_gradients.py:\d+:[\s\S]*not supported in a generate"):
        with lm.generate(IDS, max_new_tokens=2):
            h = lm.model.layers[0].output[0]
            with nll(lm.lm_head.output, A).backward():
                h.grad.save()


def test_backward_with_a_gradient_argument_is_torchs_vector_jacobian_product(models):
    """``out.backward(gradient=g)`` for a value that is not a scalar, as in torch."""
    _, lm = models["llama"]
    g = jax.random.normal(jax.random.key(2), (1, IDS.shape[1], 101))
    with lm.trace(IDS):
        h = lm.model.layers[0].output[0]
        with lm.lm_head.output.backward(gradient=g):
            spelled = h.grad.save()
    with lm.trace(IDS):
        h = lm.model.layers[0].output[0]
        with (lm.lm_head.output * g).sum().backward():
            by_hand = h.grad.save()
    np.testing.assert_allclose(spelled, by_hand, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(spelled).max()) > 0
    # a seed computed from the model's values is a constant, as torch's (detached) seed is
    with lm.trace(IDS):
        h = lm.model.layers[0].output[0]
        logits = lm.lm_head.output
        with logits.backward(gradient=jax.nn.softmax(logits)):
            seeded = h.grad.save()
    with lm.trace(IDS):
        h = lm.model.layers[0].output[0]
        logits = lm.lm_head.output
        with (logits * jax.lax.stop_gradient(jax.nn.softmax(logits))).sum().backward():
            constant = h.grad.save()
    np.testing.assert_allclose(seeded, constant, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_gradient_of_attention_weights_is_refused_not_partial(models, name):
    """Attention returns its weights after using them: a gradient at the return point
    would count only later uses (zeros here), where torch counts the internal use.
    The attention output's own gradient, next to them, is unaffected."""
    tm, lm = models[name]
    attention = layers(lm)[0].attn if name == "gpt2" else layers(lm)[0].self_attn
    with pytest.raises(JnnsightError, match=r"test_gradients.py:\d+: `weights = attention.output\[1\]`\n"
                       r"`.grad` of .*would miss part of the gradient"):
        with lm.trace(IDS):
            weights = attention.output[1]
            with nll(lm.lm_head.output, A).backward():
                weights.grad.save()
    with lm.trace(IDS):
        out = attention.output[0]
        with nll(lm.lm_head.output, A).backward():
            g = out.grad.save()
    assert float(jnp.abs(g).max()) > 0
    if name == "gpt2":  # GPT-2's attn_dropout returns the weights before the product: there
        kept = {}       # their .grad counts it, as torch's gradient of the weights does
        hook = tm.transformer.h[0].attn.register_forward_hook(
            lambda module, args, out: (out[1].retain_grad(), kept.setdefault("weights", out[1])) and None)
        try:
            nll_torch = -torch.log_softmax(tm(torch.tensor(IDS)).logits[0, -1], -1)[A]
            nll_torch.backward()
        finally:
            hook.remove()
        with lm.trace(IDS):
            weights = attention.attn_dropout.output
            with nll(lm.lm_head.output, A).backward():
                g = weights.grad.save()
            weights = weights.save()
        close(weights, kept["weights"].detach().numpy())
        close(g, kept["weights"].grad.numpy())
        assert float(jnp.abs(g).max()) > 0.1


def test_the_blocks_own_uses_of_a_value_count_in_its_gradient(models):
    tm, lm = models["llama"]
    with lm.trace(IDS):
        h = lm.model.layers[0].output[0]
        with (h ** 2).sum().backward():
            direct = h.grad.save()
        kept = h.save()
    close(direct, 2 * np.asarray(kept))

    with lm.trace(IDS):
        h = lm.model.layers[0].output[0]
        with (nll(lm.lm_head.output, A) + 0.1 * (h ** 2).sum()).backward():
            both = h.grad.save()
        kept = h.save()
    close(both, torch_grads(tm, IDS, A)[0] + 0.2 * np.asarray(kept))


def test_a_value_written_to_a_later_site_gets_the_gradient_of_both_uses(models):
    tm, lm = models["llama"]
    with lm.trace(IDS):
        a = lm.model.layers[0].output[0]
        lm.model.layers[1].output[0] = a          # layer 1's own result is discarded
        again = lm.model.layers[1].output[0]      # a read after the write: the same value
        with (nll(lm.lm_head.output, A) + 0.1 * (a ** 2).sum()).backward():
            g = a.grad.save()
            g_again = again.grad.save()
        kept = a.save()

    # torch: layer 1 returns its input unchanged, the loss adds the same square term
    held = {}

    def keep(module, args, out):
        held["a"] = hidden_of(out)
        held["a"].retain_grad()

    def replace(module, args, out):
        return (held["a"],) + tuple(out[1:]) if isinstance(out, tuple) else held["a"]

    handles = [tm.model.layers[0].register_forward_hook(keep),
               tm.model.layers[1].register_forward_hook(replace)]
    try:
        logits = tm(torch.tensor(IDS)).logits
        loss = -torch.log_softmax(logits[0, -1], -1)[A] + 0.1 * (held["a"] ** 2).sum()
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    close(g, held["a"].grad.numpy())
    close(g_again, held["a"].grad.numpy())
    assert np.abs(held["a"].grad.numpy() - 0.2 * np.asarray(kept)).max() > 1e-3


def test_a_gradient_edit_may_use_its_own_sites_value(models):
    tm, lm = models["gpt2"]
    with lm.trace(IDS):
        h0, h1 = layers(lm)[0].output[0], layers(lm)[1].output[0]
        with nll(lm.lm_head.output, A).backward():
            h1.grad = h1.grad * h1             # gradient times input, flowing upstream
            g0 = h0.grad.save()
    close(g0, torch_grads(tm, IDS, A, scale_at=1, scale=lambda h1: h1)[0])


def test_gradients_with_a_stopped_forward(models):
    tm, lm = models["llama"]
    with lm.trace(IDS) as tracer:
        h0, h1 = lm.model.layers[0].output[0], lm.model.layers[1].output[0]
        with (h1 ** 2).sum().backward():
            g0 = h0.grad.save()
        tracer.stop()

    kept = []
    handles = [layer.register_forward_hook(lambda m, a, out: kept.append(hidden_of(out)))
               for layer in tm.model.layers[:2]]
    try:
        tm(torch.tensor(IDS))
    finally:
        for handle in handles:
            handle.remove()
    kept[0].retain_grad()
    (kept[1] ** 2).sum().backward()
    close(g0, kept[0].grad.numpy())


def test_another_invokes_write_leaves_this_invokes_gradient_alone(models):
    tm, lm = models["llama"]
    other = np.array([[21, 22, 23, 24, 25, 26, 27]])
    with lm.trace() as tracer:
        with tracer.invoke(IDS):
            h = lm.model.layers[0].output[0]
            with (nll(lm.lm_head.output, A) + 0.1 * (h ** 2).sum()).backward():
                g = h.grad.save()
            kept = h.save()
        with tracer.invoke(other):  # writes its own rows of the same site
            lm.model.layers[0].output[0] = lm.model.layers[0].output[0] * 0
    close(g, torch_grads(tm, IDS, A)[0] + 0.2 * np.asarray(kept))


def test_the_gradient_of_a_value_the_block_rewrites_counts_the_write(models):
    tm, lm = models["llama"]
    with lm.trace(IDS):
        h = lm.model.layers[0].output[0]
        lm.model.layers[0].output[0] = h * 3
        with nll(lm.lm_head.output, A).backward():
            g = h.grad.save()

    held = {}

    def triple(module, args, out):
        held["h"] = hidden_of(out)
        held["h"].retain_grad()
        return (held["h"] * 3, *out[1:]) if isinstance(out, tuple) else held["h"] * 3

    handle = tm.model.layers[0].register_forward_hook(triple)
    try:
        logits = tm(torch.tensor(IDS)).logits
        (-torch.log_softmax(logits[0, -1], -1)[A]).backward()
    finally:
        handle.remove()
    close(g, held["h"].grad.numpy())

    with pytest.raises(SiteError, match="read after the block wrote"):
        with lm.trace(IDS):
            lm.model.layers[0].output[0] = lm.model.layers[0].output[0] * 3
            later = lm.model.layers[0].output[0]
            with nll(lm.lm_head.output, A).backward():
                later.grad.save()


def test_an_edit_computed_at_its_own_site_leaves_the_sites_effects_run_once(models, capfd):
    tm, lm = models["gpt2"]
    with lm.trace(IDS):
        h0, h1 = layers(lm)[0].output[0], layers(lm)[1].output[0]
        jax.debug.print("layer 1 seen {x}", x=h1[0, 0, 0])  # an effect at h1's site
        with nll(lm.lm_head.output, A).backward():
            h1.grad = h1.grad * (h1 * 2)          # a value that stage computes
            g0 = h0.grad.save()
    jax.effects_barrier()
    assert capfd.readouterr().out.count("layer 1 seen") == 1
    close(g0, torch_grads(tm, IDS, A, scale_at=1, scale=lambda h1: h1 * 2)[0])


def test_gradients_that_would_silently_be_zero_or_meaningless_are_refused(toy):
    model, tokens = toy
    with pytest.raises(SiteError, match="takes a gradient there"):
        with model.trace(tokens):
            inner = model.h[1].mlp.output
            model.h[1].skip((model.h[1].input,))
            with model.lm_head.output.sum().backward():
                inner.grad.save()
    with pytest.raises(SiteError, match="after the block read or wrote its output"):
        with model.trace(tokens):
            out = model.h[1].output
            model.h[1].skip(out)
    with pytest.raises(SiteError, match="only floating-point values have a gradient"):
        with model.trace(tokens):
            ids = model.wte.input
            with model.lm_head.output.sum().backward():
                ids.grad.save()
    # an integer loss (an argmax) has zero gradients everywhere: torch refuses it too
    with pytest.raises(WriteError, match="differentiates a floating-point scalar; this one is int32"):
        with model.trace(tokens):
            h = model.h[0].output[0]
            with model.lm_head.output[0, -1].argmax().backward():
                h.grad.save()

