"""Sharded runs on 8 simulated CPU devices against the one-device run (run by test_sharding.py).

Run directly: ``JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_check.py``.
Each check asserts; the script prints one line per mesh and "all meshes ok" at the end.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import save_file

from jnnsight import LanguageModel
from jnnsight.modeling.llama import LlamaConfig, init_variables, param_axes
from jnnsight.sharding import DEFAULT_RULES, spec_for

CONFIG = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
          "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 5000.0, "tie_word_embeddings": False}
MESHES = [((8,), ("model",)), ((2, 4), ("data", "model")), ((4, 2), ("data", "model"))]
TOL = 1e-5


def write_checkpoint(folder: Path, config: dict = CONFIG) -> None:
    """Random N(0, 0.5) weights under Hugging Face keys, as save_pretrained would write them."""
    variables = init_variables(LlamaConfig.from_hf(config), jax.random.key(0))
    flat, _ = jax.tree_util.tree_flatten_with_path(variables["params"])
    tensors = {}
    for i, (keypath, leaf) in enumerate(flat):
        key = ".".join(re.sub(r"^(\w+)_(\d+)$", r"\1.\2", k.key) for k in keypath)
        tensors[key] = np.asarray(jax.random.normal(jax.random.key(i), leaf.shape) * 0.5, np.float32)
    if config.get("tie_word_embeddings"):
        del tensors["lm_head.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def check_tied_embeddings() -> None:
    """A tied embedding is one array on the devices, loaded from a file or placed from memory."""
    folder = Path(tempfile.mkdtemp())
    write_checkpoint(folder, {**CONFIG, "tie_word_embeddings": True})
    mesh = jax.make_mesh((8,), ("model",))
    ids = np.arange(12).reshape(2, 6)
    one = LanguageModel(folder)
    with one.trace(ids):
        want = one.lm_head.output.save()
    for lm in (LanguageModel(folder, mesh=mesh),
               LanguageModel(module=one.module, variables=one.variables, mesh=mesh)):
        params = lm.variables["params"]
        assert params["lm_head"]["weight"] is params["model"]["embed_tokens"]["weight"]
        with lm.trace(ids):
            got = lm.lm_head.output.save()
        assert float(np.abs(np.asarray(got) - np.asarray(want)).max()) <= TOL * 10
    print("tied embeddings: ok")


def run(lm: LanguageModel, mesh: Mesh | None = None) -> dict:
    """Logits, a save, an edit's effect, generated tokens and gradients of one model.

    With ``mesh`` (the one given to ``LanguageModel``: explicit axes, as
    ``jax.make_mesh`` makes it), the steering vector is placed on it, as a user would.
    """
    ids = np.random.default_rng(0).integers(0, 128, (8, 6))
    steer = jnp.linspace(-1.0, 1.0, 64)
    if mesh is not None:
        steer = jax.device_put(steer, NamedSharding(mesh, PartitionSpec("model")))
    with lm.trace(ids):
        hidden = lm.model.layers[0].output[0].save()
        gathered = lm.model.layers[0].output[0][:, -1].save(gather=True)
        whole = lm.model.layers[0].output.save(gather=True)  # a tuple; the same array as hidden
        lm.model.layers[1].output[0] = lm.model.layers[1].output[0] + steer
        logits = lm.lm_head.output.save()
    with lm.trace(ids):
        h0 = lm.model.layers[0].output[0]
        with (-jax.nn.log_softmax(lm.lm_head.output[:, -1])[:, 3].sum()).backward():
            grad = h0.grad.save()
    with lm.generate(ids[:, :4], max_new_tokens=4, eos_token_id=None, repetition_penalty=1.3) as tracer:
        with tracer.all():
            lm.model.layers[1].output[0] = lm.model.layers[1].output[0] + steer
        tokens = tracer.result.save()

    def loss_fn(vec, params):
        with lm.bind(params).trace(jnp.asarray(ids)):
            lm.model.layers[1].output[0] = lm.model.layers[1].output[0] + vec
            out = lm.lm_head.output.save()
        return -jax.nn.log_softmax(out[:, -1])[:, 3].sum()

    steer_grad = jax.jit(jax.grad(loss_fn))(jnp.linspace(-1.0, 1.0, 64), lm.variables)
    assert isinstance(gathered, np.ndarray)  # gathered to the host on request
    # ... and only that save: `hidden`, the same value saved plainly, stays a jax.Array
    assert isinstance(whole[0], np.ndarray) and isinstance(hidden, jax.Array)
    np.testing.assert_array_equal(whole[0], np.asarray(hidden))

    # Arrays on the user's mesh or on one device, in operations beyond `+` and in invokes;
    # parameters and an envoy call's argument on the user's mesh.
    one = jax.device_put(jnp.linspace(1.0, -1.0, 64), jax.devices()[-1])
    with lm.trace() as tracer:
        with tracer.invoke(ids[:4]):
            h = lm.model.layers[1].output[0]
            lm.model.layers[1].output[0] = jnp.where(h > 0, steer, h)
        with tracer.invoke(ids[4:]):
            h = lm.model.layers[1].output[0]
            lm.model.layers[1].output[0] = jax.lax.dynamic_update_slice_in_dim(h, h[:, -1:] + one, 5, 1)
        with tracer.invoke():
            invoked = lm.lm_head.output.save()
    if mesh is not None:  # reached through a list, it is not moved: the error says what to do
        vectors = [steer]
        try:
            with lm.trace(ids):
                h = lm.model.layers[1].output[0]
                lm.model.layers[1].output[0] = jnp.where(h > 0, vectors[0], h)
        except ValueError as err:
            assert "NamedSharding(lm.mesh, spec)" in " ".join(getattr(err, "__notes__", [])), err
        else:
            raise AssertionError("an array on the user's mesh in a list was not refused")
        vectors = [jax.device_put(steer, NamedSharding(lm.mesh, PartitionSpec("model")))]
        with lm.trace(ids):  # placed on lm.mesh as the note says, it works
            h = lm.model.layers[1].output[0]
            lm.model.layers[1].output[0] = jnp.where(h > 0, vectors[0], h)
            from_list = lm.lm_head.output.save()
        with lm.trace(ids):
            h = lm.model.layers[1].output[0]
            lm.model.layers[1].output[0] = jnp.where(h > 0, steer, h)
            by_name = lm.lm_head.output.save()
        np.testing.assert_allclose(from_list, by_name, atol=TOL)
        try:  # inside set_mesh of the user's explicit-axes mesh: a note says what to do
            with jax.set_mesh(mesh):
                with lm.trace(ids):
                    lm.lm_head.output.save()
        except ValueError as err:
            assert "jax.set_mesh(lm.mesh)" in " ".join(getattr(err, "__notes__", [])), err
    theirs = lm.variables if mesh is None else jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, x.sharding.spec)), lm.variables)
    with lm.bind(theirs).trace(ids):
        bound = lm.lm_head.output.save()
    # the function form and a sampling key take them from the user's mesh too
    intervened = lm.intervene(lambda: lm.lm_head.output)(theirs, ids)[1]
    key = jax.random.key(4) if mesh is None else jax.device_put(
        jax.random.key(4), NamedSharding(mesh, PartitionSpec()))
    with lm.generate(ids[:, :4], max_new_tokens=3, do_sample=True, key=key, eos_token_id=None) as tracer:
        sampled = tracer.result.save()
    placed = hidden if mesh is None else jax.device_put(hidden, NamedSharding(mesh, PartitionSpec()))
    lens = lm.lm_head(lm.model.norm(placed))
    return {"hidden": hidden, "gathered": gathered, "logits": logits, "grad": grad, "tokens": tokens,
            "steer_grad": steer_grad, "invoked": invoked, "bound": bound, "lens": lens,
            "intervened": intervened, "sampled": sampled}


def main() -> None:
    assert len(jax.devices()) == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    warnings.simplefilter("ignore")  # the checkpoint has no tokenizer files: ids only
    folder = Path(tempfile.mkdtemp())
    write_checkpoint(folder)
    reference = run(LanguageModel(folder))
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(LanguageModel(folder).variables))
    for shape, names in MESHES:
        mesh = jax.make_mesh(shape, names)
        lm = LanguageModel(folder, mesh=mesh)
        # Every parameter placed as the rules say; the model axis splits the bytes.
        flat, _ = jax.tree_util.tree_flatten_with_path(lm.variables)
        for keypath, leaf in flat:
            path = tuple(k.key for k in keypath)
            want = spec_for(param_axes(path), leaf.shape, mesh, DEFAULT_RULES)
            got = leaf.sharding.spec
            assert tuple(got) + (None,) * (leaf.ndim - len(got)) == tuple(want) + (None,) * (leaf.ndim - len(want)), (path, got, want)
        device = jax.devices()[0]
        local = sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(lm.variables)
                    for s in leaf.addressable_shards if s.device == device)
        model_size = mesh.shape["model"]
        assert local <= total / model_size * 1.1, (local, total, model_size)
        # The same numbers as one device.
        ours = run(lm, mesh)
        for name, value in reference.items():
            if name in ("tokens", "sampled"):
                np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(value))
            else:
                diff = float(np.abs(np.asarray(ours[name]) - np.asarray(value)).max())
                scale = max(1.0, float(np.abs(np.asarray(value)).max()))
                assert diff <= TOL * scale, (shape, name, diff, scale)
        assert len(ours["hidden"].sharding.device_set) > 1  # a saved value stays sharded
        print(f"mesh {shape} {names}: ok; device 0 holds {local / total:.3f} of the parameter "
              f"bytes; a saved hidden state spans {len(ours['hidden'].sharding.device_set)} devices")
    check_tied_embeddings()
    print("all meshes ok")


if __name__ == "__main__":
    sys.exit(main())
