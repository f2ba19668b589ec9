"""What bounds a float32 forward of a small model on this CPU: matrix products at few rows.

The trace, generation and optimization benchmarks compare jnnsight with nnsight on
SmolLM2-135M, whose forward is mostly matrix products of a few token rows (1 in a decode
step, 8 to 24 in a prompt) with weights of 576 x 1536. This script measures those products
alone, in XLA (through ``jax.jit``) and in PyTorch, so the ratios there can be read against
what the kernels themselves reach here. XLA runs them two ways: the plain ``x @ w.T``
(one ``dot_general``: what the model families compute) and weight first, ``(w @ x.T).T``
with the transposes kept out of the product by optimization barriers (XLA folds them into
the ``dot`` otherwise). The second is faster at a few rows here, and the model families
still use the first: see docs/architecture.md, "Matrix products on CPU".

The workload: a chain of ``--layers`` MLP blocks (``x + down(tanh(up(x)))``, up 576 -> 1536,
down 1536 -> 576, weights stored as PyTorch's ``(out, in)``, float32, 566 MB in all at the
default 80 blocks, more than any cache), each product depending on the previous one as in
a model, at each row count in ``--rows``. One call of the chain reads every weight once.
Medians of ``--repeats`` interleaved calls after two untimed ones. Also measured: the
memory bandwidth of a jitted ``jnp.sum`` and of ``torch.sum`` over the same weights, the
floor of any product that reads them.

Usage::

    python scripts/bench_matmul.py                 # about a minute here
    python scripts/bench_matmul.py --rows 1 16 --layers 20

It prints, for each row count, ms per chain and GFLOP/s of each variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

WIDTH, HIDDEN = 576, 1536  # SmolLM2-135M's hidden and MLP widths


def median_ms(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall time of each call, the calls interleaved, after two untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 2):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ >= 2:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 24, 64])
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    ups = [rng.standard_normal((HIDDEN, WIDTH), np.float32) * 0.02 for _ in range(args.layers)]
    downs = [rng.standard_normal((WIDTH, HIDDEN), np.float32) * 0.02 for _ in range(args.layers)]
    weight_bytes = sum(w.nbytes for w in ups + downs)
    j_ups, j_downs = jax.device_put(ups), jax.device_put(downs)
    t_ups, t_downs = [torch.from_numpy(w) for w in ups], [torch.from_numpy(w) for w in downs]

    def plain(x: Any, w: Any) -> Any:  # x @ w.T, as torch's F.linear
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))

    def weight_first(x: Any, w: Any) -> Any:  # (w @ x.T).T, the transposes outside the product
        columns = jax.lax.optimization_barrier(x.T)
        return jax.lax.optimization_barrier(w @ columns).T

    def chain(linear: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        def run(x: Any, ups: list, downs: list) -> Any:
            for up, down in zip(ups, downs):
                x = x + linear(jnp.tanh(linear(x, up)), down)
            return x
        return jax.jit(run)

    jax_chains = {"plain": chain(plain), "weight_first": chain(weight_first)}

    def torch_chain(x: Any) -> Any:
        with torch.no_grad():
            for up, down in zip(t_ups, t_downs):
                x = x + torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, up)), down)
        return x

    j_sum = jax.jit(lambda ws: sum(jnp.sum(w) for w in ws))
    all_j, all_t = j_ups + j_downs, t_ups + t_downs
    floor = median_ms({
        "jax": lambda: jax.block_until_ready(j_sum(all_j)),
        "torch": lambda: sum(float(torch.sum(w)) for w in all_t),
    }, args.repeats)

    print(f"{args.layers} MLP blocks {WIDTH} -> {HIDDEN} -> {WIDTH}, float32, "
          f"{weight_bytes / 1e6:.0f} MB of weights; {torch.get_num_threads()} threads; "
          f"JAX {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}")
    print(f"reading the weights once (a sum): JAX {floor['jax']:.1f} ms "
          f"({weight_bytes / floor['jax'] / 1e6:.1f} GB/s), "
          f"torch {floor['torch']:.1f} ms ({weight_bytes / floor['torch'] / 1e6:.1f} GB/s)")
    print()
    print("ms per chain (GFLOP/s):")
    print()
    print("| rows | XLA, x @ w.T | XLA, (w @ x.T).T | torch F.linear | torch / XLA plain | torch / XLA weight first |")
    print("|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        x = rng.standard_normal((rows, WIDTH), np.float32)
        jx, tx = jnp.asarray(x), torch.from_numpy(x)
        expected = torch_chain(tx).numpy()
        for run in jax_chains.values():  # the same arithmetic, up to float32 rounding
            np.testing.assert_allclose(np.asarray(run(jx, j_ups, j_downs)), expected, rtol=1e-3, atol=1e-3)
        calls: dict[str, Callable[[], Any]] = {
            name: (lambda run=run: jax.block_until_ready(run(jx, j_ups, j_downs)))
            for name, run in jax_chains.items()}
        calls["torch"] = lambda: torch_chain(tx)
        ms = median_ms(calls, args.repeats)
        flop = 2 * rows * 2 * WIDTH * HIDDEN * args.layers
        cells = [f"{ms[name]:.1f} ({flop / ms[name] / 1e6:.0f})" for name in ("plain", "weight_first", "torch")]
        cells += [f"{ms['torch'] / ms[name]:.2f}" for name in ("plain", "weight_first")]
        print(f"| {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
