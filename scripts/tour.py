"""A tour of jnnsight's API: the nnsight README's examples, in JAX, on a toy model.

Run: ``python scripts/tour.py``. The model is a small GPT-style transformer with
random weights (``jnnsight.toy``), so the numbers mean nothing; the point is
what each block reads, edits and returns. The language-model tour on real
weights comes with ``LanguageModel``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jnnsight
from jnnsight.toy import toy_model


def section(title: str) -> None:
    print(f"\n== {title} ==")


def main() -> None:
    model, tokens = toy_model(layers=4, width=64, heads=4, vocab=128, length=10, batch=2)

    section("The module tree (print(model))")
    print(model)

    section("Save the last block's hidden state and the logits")
    with model.trace(tokens):
        hidden_states = model.h[-1].output[0].save()
        logits = model.output.save()
    print(f"hidden_states: jax.Array={isinstance(hidden_states, jax.Array)} {hidden_states.shape}")
    print(f"logits:        jax.Array={isinstance(logits, jax.Array)} {logits.shape}")

    section("Operations: any jax.numpy function works on values in a block")
    with model.trace(tokens):
        hidden_pre = model.h[-1].output[0].save()
        hs_sum = jnp.sum(hidden_pre).save()
        hs_edited = (hidden_pre + hs_sum).save()
    print(f"sum of hidden states: {float(hs_sum):.4f}")
    print(f"edited - original:    {float((hs_edited - hidden_pre).mean()):.4f} (= the sum)")

    section("Setting: add noise to the last MLP's output")
    noise = jnp.sqrt(0.001) * jax.random.normal(jax.random.key(0), (2, 10, 64))
    with model.trace(tokens):
        before = model.h[-1].mlp.output.save()
        model.h[-1].mlp.output = before + noise
        after = model.h[-1].mlp.output.save()
    print(f"mean |after - before| = {float(jnp.abs(after - before).mean()):.5f}")

    section("Ad-hoc modules: the logit lens through ln_f and lm_head")
    with model.trace(tokens):
        hidden = model.h[-2].output[0]
        lens = model.lm_head(model.ln_f(hidden)).save()
        lens_tokens = jax.nn.softmax(lens, axis=-1).argmax(axis=-1).save()
    print(f"lens logits {lens.shape}; predicted ids of row 0: {lens_tokens[0].tolist()}")

    section("Cross-prompt: the embeddings of one invoke written into another")
    with model.trace() as tracer:
        with tracer.invoke(tokens[:1]):
            embeddings = model.wte.output
            source = model.output.save()
        with tracer.invoke(tokens[1:]):
            model.wte.output = embeddings
            patched = model.output.save()
    print(f"patched output equals the source prompt's: {bool(jnp.allclose(source, patched, atol=1e-5))}")

    section("A block is a pure function: jax.jit and jax.grad through an edit")

    @jax.jit
    def loss(steer: jax.Array) -> jax.Array:
        with model.trace(tokens):
            model.h[1].output[0] = model.h[1].output[0] + steer
            out = model.output.save()
        return -jax.nn.log_softmax(out[:, -1])[:, 7].mean()

    steer = jnp.zeros(64)
    for step in range(3):
        value, grad = jax.value_and_grad(loss)(steer)
        steer = steer - 0.5 * grad
        print(f"step {step}: loss {float(value):.4f}")

    section("Shapes without running: model.scan")
    with model.scan(tokens):
        fc = model.h[0].mlp.c_fc.output.save()
    print(f"h[0].mlp.c_fc.output: {fc}")

    section("Every module's output: tracer.cache()")
    with model.trace(tokens) as tracer:
        cache = tracer.cache()
    print(f"{len(cache)} modules; cache['model.h.0.attn'].output.shape = "
          f"{cache['model.h.0.attn'].output.shape}, as cache.model.h[0].attn.output")
    print(f"\njnnsight {jnnsight.__version__}, jax {jax.__version__}, device {jax.devices()[0]}")


if __name__ == "__main__":
    main()
