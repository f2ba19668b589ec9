"""Two JAX processes on one machine, 4 CPU devices each, as hosts of one (2, 4) mesh
(run by test_multihost.py).

Run directly: ``python tests/multihost_check.py``. The launcher writes a random
checkpoint, starts two workers (``jax.distributed.initialize`` over localhost, gloo
collectives), and each worker loads the checkpoint onto the global mesh, runs a trace
with a save and an edit, gradients and a steered generation, and checks the shards it
holds against a one-device run of its own. Each worker prints one line; the launcher prints "all hosts ok" at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

WORKERS = 2
TOL = 1e-5


def launch() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from multidevice_check import write_checkpoint

    folder = Path(tempfile.mkdtemp())
    write_checkpoint(folder)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JNNSIGHT_CHECKPOINT=str(folder), JNNSIGHT_COORDINATOR=f"localhost:{port}")
    workers = [subprocess.Popen([sys.executable, __file__, str(i)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(WORKERS)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for i, (worker, out) in enumerate(zip(workers, outputs)):
        print(f"--- worker {i} (exit {worker.returncode})\n{out[-3000:]}")
    if all(w.returncode == 0 for w in workers):
        print("all hosts ok")
        return 0
    return 1


def work(index: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["JNNSIGHT_COORDINATOR"], num_processes=WORKERS,
                               process_id=index)
    import warnings

    from jnnsight import ActivationStore, LanguageModel
    from jnnsight.errors import JnnsightError
    from jnnsight.loading import checkpoint

    warnings.simplefilter("ignore")  # the checkpoint has no tokenizer files: ids only
    assert jax.process_count() == WORKERS and len(jax.devices()) == 4 * WORKERS
    folder = Path(os.environ["JNNSIGHT_CHECKPOINT"])
    ids = np.random.default_rng(0).integers(0, 128, (8, 6))  # the same on every host
    steer = jnp.linspace(-1.0, 1.0, 64)

    def run(lm: LanguageModel) -> tuple:
        """A save, an edit's effect, gradients, and steered generated tokens."""
        with lm.trace(ids):
            hidden = lm.model.layers[0].output[0].save()
            lm.model.layers[1].output[0] = lm.model.layers[1].output[0] + steer
            logits = lm.lm_head.output.save()
            last = lm.lm_head.output[:, -1].save(gather=True)
        assert isinstance(last, np.ndarray) and last.shape == (8, 128)  # every row, every host
        with lm.trace(ids):
            h0 = lm.model.layers[0].output[0]
            with (-jax.nn.log_softmax(lm.lm_head.output[:, -1])[:, 3].sum()).backward():
                grad = h0.grad.save()
        with lm.generate(ids[:, :4], max_new_tokens=3) as tracer:
            with tracer.all():
                lm.model.layers[1].output[0] = lm.model.layers[1].output[0] + steer
            tokens = tracer.result.save()
        return hidden, logits, grad, tokens, last

    mesh = jax.make_mesh((WORKERS, 4), ("data", "model"))  # hosts along the data axis
    sharded = LanguageModel(folder, mesh=mesh)
    local = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(sharded.variables)
                for s in leaf.addressable_shards)
    ours = run(sharded)
    hidden, logits = ours[:2]
    assert not logits.is_fully_addressable  # the batch spans the hosts

    with jax.default_device(jax.local_devices()[0]):
        one = LanguageModel(folder)
        reference = run(one)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(one.variables))
    worst = 0.0  # relative to the largest value
    for value, want in zip(ours, reference):
        want = np.asarray(want)
        scale = max(1.0, float(np.abs(want).max()))
        parts = [(value, ...)] if isinstance(value, np.ndarray) else \
            [(s.data, s.index) for s in value.addressable_shards]
        for data, where in parts:
            diff = np.abs(np.asarray(data, np.float64) - want[where]).max()
            worst = max(worst, float(diff) / scale)
    assert worst <= TOL, worst

    # A model axis across the hosts: each host reads only its rows of the checkpoint.
    read: list[int] = []
    original = checkpoint._read_raw

    def counting(*args):
        array = original(*args)
        read.append(array.nbytes)
        return array

    checkpoint._read_raw = counting
    across = LanguageModel(folder, mesh=jax.make_mesh((WORKERS, 4), ("model", "data")))
    checkpoint._read_raw = original
    with across.trace(ids):
        across.model.layers[1].output[0] = across.model.layers[1].output[0] + steer
        logits_across = across.lm_head.output.save()
    want = np.asarray(reference[1])
    for shard in logits_across.addressable_shards:
        diff = np.abs(np.asarray(shard.data, np.float64) - want[shard.index]).max()
        assert diff <= TOL * max(1.0, float(np.abs(want).max())), diff
    device = jax.local_devices()[0]
    held = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(across.variables)
               for s in leaf.addressable_shards if s.device == device)
    assert sum(read) <= 0.55 * total and held <= 0.55 * total, (sum(read), held, total)

    try:
        ActivationStore(tempfile.mkdtemp()).append(h=hidden)
        raise AssertionError("appending a value of other hosts must be refused")
    except JnnsightError as err:
        assert "other processes" in str(err)
    rows = sorted({s.index[0].start or 0 for s in logits.addressable_shards})
    print(f"host {index}: ok; holds {local / total:.2f} of the parameter bytes on its devices, "
          f"batch rows from {rows}; logits, saves (one gathered), gradients and tokens within "
          f"{worst:.1e}; with the model axis across hosts it read {sum(read) / total:.2f} of the "
          f"checkpoint, and each device holds {held / total:.2f} of it")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        work(int(sys.argv[1]))
    else:
        sys.exit(launch())
