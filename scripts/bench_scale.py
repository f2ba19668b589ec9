"""Scale on this CPU: a trace on a simulated 8-device mesh against one device, and loading
a 1 GB checkpoint straight into shards against an eager load.

The spec (from the issue): tokens/s of a trace with saves and an edit on the
simulated 8-device mesh versus one device at the same global batch (a report,
no target on CPU), and the loading time and peak host memory of a sharded
checkpoint of about 1 GB versus an eager load.

Method. The script sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX starts (8 CPU "devices" sharing this machine's cores: the numbers
show what the partitioned program costs here, not what 8 accelerators give).

- Throughput: a random-weight Llama-shaped model (width 512, 8 layers, 8 heads,
  MLP 1536, vocabulary 8192: 43M parameters, float32); a batch of 16 prompts of
  64 tokens; the trace saves every layer's hidden state and adds a vector to
  layer 4's. One device (no mesh) against meshes (8,) ``("model",)``, (2, 4) and
  (4, 2) ``("data", "model")``; median of ``--repeats`` traces after one untimed.
- Loading: a random Llama-shaped checkpoint of about 1 GB (width 1024, 16 layers,
  MLP 4096, vocabulary 32000, float32, one safetensors file) is written once;
  each load runs in a fresh subprocess that reports its wall time and its peak
  resident memory (``VmHWM``) and the bytes its device buffers hold:
  ``LanguageModel(folder)`` then ``jax.device_put`` onto the (8,) ``("model",)``
  mesh by the rules (eager), against ``LanguageModel(folder, mesh=...)`` (tensor
  by tensor into the shards). On CPU the simulated devices' buffers live in
  host memory, so both end with one copy of the model there; the difference is
  what the eager load holds on the way.

Usage::

    python scripts/bench_scale.py             # about 3 minutes here
    python scripts/bench_scale.py --repeats 3 --skip-load
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jnnsight import LanguageModel  # noqa: E402
from jnnsight.modeling.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

SMALL = {"model_type": "llama", "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536,
         "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
LARGE = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096,
         "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
MESHES = [((8,), ("model",)), ((2, 4), ("data", "model")), ((4, 2), ("data", "model"))]


def write_checkpoint(config: dict, folder: Path) -> int:
    """Random N(0, 0.02) float32 weights under Hugging Face keys; returns the file's bytes."""
    from safetensors.numpy import save_file

    module = LlamaForCausalLM(LlamaConfig.from_hf(config))
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    flat, _ = jax.tree_util.tree_flatten_with_path(shapes["params"])
    rng = np.random.default_rng(0)
    tensors = {}
    for keypath, leaf in flat:
        key = ".".join(re.sub(r"^(\w+)_(\d+)$", r"\1.\2", k.key) for k in keypath)
        tensors[key] = (rng.standard_normal(leaf.shape, np.float32) * 0.02).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return (folder / "model.safetensors").stat().st_size


def throughput(folder: Path, repeats: int) -> list[tuple[str, float]]:
    ids = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (16, 64))
    steer = jnp.ones(SMALL["hidden_size"]) * 0.1
    rows = []
    for label, mesh in [("one device", None)] + [
            (f"mesh {shape} {names}", jax.make_mesh(shape, names)) for shape, names in MESHES]:
        lm = LanguageModel(folder, mesh=mesh)

        def run() -> None:
            with lm.trace(ids):
                saves = [layer.output[0].save() for layer in lm.model.layers]
                lm.model.layers[4].output[0] = lm.model.layers[4].output[0] + steer
            jax.block_until_ready(saves)

        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rows.append((label, ids.size / statistics.median(times)))
    return rows


def peak_memory() -> int:
    """This process's peak resident bytes (``VmHWM``: unlike ``ru_maxrss``, it does not
    count the parent's memory that a forked child held before ``exec``)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def load_once(folder: str, how: str) -> None:
    """In a fresh process: load, report wall seconds and peak resident bytes as JSON."""
    mesh = jax.make_mesh((8,), ("model",))
    start = time.perf_counter()
    if how == "nothing":  # the baseline: JAX started, nothing loaded
        variables = jnp.zeros(())
    elif how == "eager":
        from jnnsight.modeling import param_axes_of
        from jnnsight.sharding import automatic, param_shardings

        lm = LanguageModel(folder)
        mesh = automatic(mesh)
        variables = jax.device_put(lm.variables, param_shardings(param_axes_of(lm.module), lm.variables, mesh))
    else:
        variables = LanguageModel(folder, mesh=mesh).variables
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    held = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(variables) for s in x.addressable_shards)
    print(json.dumps({"seconds": seconds, "peak": peak_memory(), "devices": held}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--load-once", nargs=2, metavar=("FOLDER", "HOW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the random checkpoints have no tokenizer
    if args.load_once:
        load_once(*args.load_once)
        return

    root = Path(tempfile.mkdtemp())
    write_checkpoint(SMALL, root / "small")
    print(f"{len(jax.devices())} CPU devices; JAX {jax.__version__}\n")
    print("| run (16 x 64 tokens, 8 saves, one edit) | tokens/s |")
    print("|---|---:|")
    for label, rate in throughput(root / "small", args.repeats):
        print(f"| {label} | {rate:,.0f} |")
    if args.skip_load:
        return

    size = write_checkpoint(LARGE, root / "large")
    baseline = json.loads(subprocess.run(
        [sys.executable, __file__, "--load-once", "-", "nothing"],
        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])["peak"]
    print(f"\ncheckpoint: {size / 2**30:.2f} GiB float32 safetensors; a process that starts JAX "
          f"and jnnsight and loads nothing peaks at {baseline / 2**30:.2f} GiB\n")
    print("| load onto the (8,) model mesh | seconds | peak host memory, GiB | device buffers, GiB |")
    print("|---|---:|---:|---:|")
    for how, label in (("eager", "eager: load, then device_put by the rules"),
                       ("sharded", "LanguageModel(folder, mesh=mesh): tensor by tensor into shards")):
        out = subprocess.run([sys.executable, __file__, "--load-once", str(root / "large"), how],
                             capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"| {label} | {result['seconds']:.1f} | {result['peak'] / 2**30:.2f} | "
              f"{result['devices'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
