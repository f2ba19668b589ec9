"""Gradients through blocks and trainable interventions, against torch autograd with a
forward hook on the same weights; optax train steps; orbax checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jnnsight
from conftest import tiny_language_model
from jnnsight import LinearProbe, LowRankRotation, SteeringVector, at_positions
from jnnsight.interventions import orthonormal

torch = pytest.importorskip("torch")

IDS = np.array([[11, 12, 13, 14, 15, 16, 17]])
TARGET = 42


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimize")
    return {name: tiny_language_model(name, root / name) for name in ("gpt2", "llama")}


def block(lm, i: int):
    return lm.transformer.h[i] if "transformer" in dir(lm) else lm.model.layers[i]


def torch_block(tm, i: int):
    return tm.transformer.h[i] if hasattr(tm, "transformer") else tm.model.layers[i]


def nll(logits: jax.Array) -> jax.Array:
    return -jax.nn.log_softmax(logits[0, -1])[TARGET]


def torch_steering_grad(tm, steer: np.ndarray, layer: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Loss, d loss / d steer and d loss / d lm_head.weight in torch, steering by a hook."""
    vec = torch.tensor(steer, requires_grad=True)

    def hook(module, args, out):
        if isinstance(out, tuple):
            return (out[0] + vec, *out[1:])
        return out + vec

    tm.zero_grad()
    handle = torch_block(tm, layer).register_forward_hook(hook)
    try:
        logits = tm(torch.tensor(IDS)).logits
        loss = -torch.log_softmax(logits[0, -1], -1)[TARGET]
        loss.backward()
    finally:
        handle.remove()
    return float(loss), vec.grad.numpy(), tm.lm_head.weight.grad.numpy()


def close(a, b, rtol=1e-4) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(a - b).max() <= rtol * max(1.0, np.abs(b).max()), np.abs(a - b).max()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gradients_through_a_block_equal_torch_autograd_in_every_spelling(models, name):
    tm, lm = models[name]
    width = lm.variables["params"]["lm_head"]["weight"].shape[1]
    steer = np.random.default_rng(0).normal(0, 1.0, width).astype(np.float32)
    loss_t, grad_t, head_t = torch_steering_grad(tm, steer, 1)

    def with_block(vec):                                    # jax.grad, no jit
        with lm.trace(IDS):
            block(lm, 1).output[0] = block(lm, 1).output[0] + vec
            logits = lm.lm_head.output.save()
        return nll(logits)

    @jax.jit
    def bound(vec, params):                                 # jit: parameters are an input
        with lm.bind(params).trace(jnp.asarray(IDS)):
            block(lm, 1).output[0] = block(lm, 1).output[0] + vec
            logits = lm.lm_head.output.save()
        return nll(logits)

    def body(vec):
        block(lm, 1).output[0] = block(lm, 1).output[0] + vec
        return lm.lm_head.output

    forward = lm.intervene(body)                            # the function form
    functional = lambda vec, params: nll(forward(params, jnp.asarray(IDS), vec)[1])  # noqa: E731

    vec = jnp.asarray(steer)
    loss, grad = jax.value_and_grad(with_block)(vec)
    close(loss, loss_t)
    close(grad, grad_t)
    close(jax.grad(bound)(vec, lm.variables), grad_t)
    grad_vec, grad_params = jax.grad(functional, argnums=(0, 1))(vec, lm.variables)
    close(grad_vec, grad_t)
    head = grad_params["params"]["lm_head"]["weight"]
    if name == "gpt2":  # tied: torch's one parameter gets both uses' gradients
        head = head + grad_params["params"]["transformer"]["wte"]["weight"]
    close(head, head_t)


def test_a_bound_model_is_an_input_of_the_compiled_program_not_a_constant(models):
    _, lm = models["llama"]

    def loss(vec, params):
        with lm.bind(params).trace(jnp.asarray(IDS)):
            lm.model.layers[1].output[0] = lm.model.layers[1].output[0] + vec
            logits = lm.lm_head.output.save()
        return nll(logits)

    params_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(lm.variables))
    text = jax.jit(loss).lower(jnp.zeros(64), lm.variables).as_text()
    assert len(text) < params_bytes / 4  # constants would be printed in full
    with pytest.raises(TypeError, match="model's own structure"):
        lm.bind({"params": {}})
    with pytest.raises(TypeError, match=r"this is `model.variables\['params'\]`'s, so pass `\{'params': ...\}`"):
        lm.bind(lm.variables["params"])


def test_a_bound_models_envoys_apply_the_bound_variables(models):
    _, lm = models["llama"]
    doubled = jax.tree_util.tree_map(lambda x: x * 2, lm.variables)
    bound = lm.bind(doubled)
    with bound.trace(IDS):
        h = lm.model.norm.output.save()
        logits = lm.lm_head.output.save()
    head = np.asarray(lm.variables["params"]["lm_head"]["weight"])
    close(logits, np.asarray(h) @ (2 * head).T)           # the block ran on the bound weights
    close(bound.lm_head(h), np.asarray(h) @ (2 * head).T)  # so does the bound model's envoy
    close(lm.lm_head(h), np.asarray(h) @ head.T)           # and the model's own, on its own


def test_a_steering_vector_trained_with_optax_raises_the_target_probability(models, compile_counter):
    _, lm = models["llama"]
    ids = jnp.asarray(IDS)
    forward = lm.intervene(lambda steer, positions: _steer_at(lm, steer, positions))

    def loss_fn(steer, variables, ids, positions):
        return nll(forward(variables, ids, steer, positions)[1])

    optimizer = optax.adam(1.0)  # hidden states of N(0, 0.5) weights are large
    steer = SteeringVector.zeros(64)
    state = optimizer.init(steer)
    step = jnnsight.train_step(loss_fn, optimizer)
    last = jnp.array([-1])
    before = float(jnp.exp(-loss_fn(steer, lm.variables, ids, last)))
    losses = []
    for i in range(25):
        steer, state, loss = step(steer, state, lm.variables, ids, last)
        losses.append(float(loss))
        if i == 0:
            compile_counter.clear()
    assert compile_counter == []  # one compiled step for all of them
    after = float(jnp.exp(-loss_fn(steer, lm.variables, ids, last)))
    assert after > 0.5 > before and losses[-1] < losses[0]
    # Other positions are an array of the same shape: no new program.
    step(steer, state, lm.variables, ids, jnp.array([2]))
    assert compile_counter == []


def _steer_at(lm, steer, positions):
    h = lm.model.layers[1].output[0]
    lm.model.layers[1].output[0] = steer(h, positions)
    return lm.lm_head.output


def test_at_positions_edits_only_the_chosen_positions():
    value = jnp.zeros((2, 5, 3))
    edited = jnp.ones((2, 5, 3))
    got = at_positions(value, edited, jnp.array([0, -1]))
    np.testing.assert_array_equal(got[:, :, 0], [[1, 0, 0, 0, 1]] * 2)
    mask = jnp.array([[True, False, False, False, False], [False, False, True, False, False]])
    np.testing.assert_array_equal(at_positions(value, edited, mask)[:, :, 0], mask)
    np.testing.assert_array_equal(at_positions(value, edited, None), edited)
    # positions past either end edit nothing (they do not wrap around)
    for outside in ([5], [-6], [7, -9]):
        np.testing.assert_array_equal(at_positions(value, edited, jnp.array(outside)), value)
    one = jnp.zeros((2, 1, 3))  # a decode step's single position: -1 is it, 3 is not there
    np.testing.assert_array_equal(at_positions(one, one + 1, jnp.array([-1])), one + 1)
    np.testing.assert_array_equal(at_positions(one, one + 1, jnp.array([3])), one)
    # [batch, k] indices: each row its own positions (a subject token per prompt)
    per_row = at_positions(value, edited, jnp.array([[0, 1], [3, -1]]))
    np.testing.assert_array_equal(per_row[:, :, 0], [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(at_positions(value, edited, jnp.array([[2]]))[:, :, 0],
                                  [[0, 0, 1, 0, 0]] * 2)  # one row of indices for every row
    # bad shapes: three rows of indices for two, a 3-D array, a mask for three rows
    for bad in (jnp.zeros((3, 1), int), jnp.zeros((2, 1, 1), int), jnp.zeros((3, 5), bool)):
        with pytest.raises(ValueError, match="do not fit a value of shape") as error:
            at_positions(value, edited, bad)
        assert "test_optimize.py" in str(error.value).splitlines()[0]
    # a mask of the prompt's length at a one-position decode step; positions as floats
    for bad, says in (((one, jnp.ones(5, bool)), "one entry per position: 1 here"),
                      ((value, jnp.ones((2, 4), bool)), "5 here"),
                      ((value, jnp.array([1.0])), "not float32")):
        with pytest.raises(ValueError, match=says):
            at_positions(bad[0], bad[0], bad[1])


def test_das_rotation_interchanges_its_subspace_and_stays_orthonormal_while_training(models):
    _, lm = models["llama"]
    das = LowRankRotation.random(jax.random.key(0), width=64, rank=3)
    base, source = jax.random.normal(jax.random.key(1), (2, 1, 4, 64))
    basis = das.basis
    patched = das(base, source)
    close(patched @ basis, source @ basis, 1e-5)                        # the subspace is the source's
    rest = jnp.eye(64) - basis @ basis.T
    close(patched @ rest, base @ rest, 1e-5)                            # the rest is the base's
    close(LowRankRotation.random(jax.random.key(2), 64, 64)(base, source), source, 1e-5)
    half = LowRankRotation.random(jax.random.key(0), 64, 3, dtype=jnp.bfloat16)  # QR in float32
    assert half.basis.dtype == jnp.bfloat16
    close(half.basis.astype(jnp.float32), orthonormal(half.weight.astype(jnp.float32)), 1e-2)
    for rank in (0, 65):  # a basis of more directions than the width would silently have fewer
        with pytest.raises(ValueError, match=f"1 to width \\(64\\), got {rank}"):
            LowRankRotation.random(jax.random.key(2), 64, rank)

    # Train it to move prompt b's output toward prompt a's next token at layer 1.
    a, b = jnp.asarray([[31, 32, 33, 34, 35]]), jnp.asarray([[41, 42, 43, 44, 45]])

    def body(das):
        source = lm.model.layers[1].output[0][:1]
        base = lm.model.layers[1].output[0][1:]
        both = jnp.concatenate([source, das(base, source, jnp.array([-1]))])
        lm.model.layers[1].output[0] = both
        return lm.lm_head.output

    forward = lm.intervene(body)
    target = int(lm.module.apply(lm.variables, a).logits[0, -1].argmax())

    def loss_fn(das, variables):
        logits = forward(variables, jnp.concatenate([a, b]), das)[1]
        return -jax.nn.log_softmax(logits[1, -1])[target]

    optimizer = optax.adam(0.05)
    state = optimizer.init(das)
    step = jnnsight.train_step(loss_fn, optimizer)
    first = float(loss_fn(das, lm.variables))
    for _ in range(20):
        das, state, loss = step(das, state, lm.variables)
    assert float(loss) < first
    basis = das.basis
    assert float(jnp.abs(basis.T @ basis - jnp.eye(3)).max()) <= 1e-5


def test_a_linear_probe_learns_to_read_a_site(models):
    _, lm = models["llama"]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 101, (64, 5)))
    labels = (ids[:, -1] % 2).astype(jnp.int32)
    with lm.trace(ids):
        features = lm.model.layers[0].output[0][:, -1].save()

    def loss_fn(probe, features, labels):
        return optax.softmax_cross_entropy_with_integer_labels(probe(features), labels).mean()

    optimizer = optax.adam(0.05)
    probe = LinearProbe.zeros(64, classes=2)
    state = optimizer.init(probe)
    step = jnnsight.train_step(loss_fn, optimizer)
    for _ in range(200):
        probe, state, _ = step(probe, state, features, labels)
    accuracy = float((probe(features).argmax(-1) == labels).mean())
    assert accuracy >= 0.9


def test_train_step_fine_tunes_tied_parameters_and_donates_the_rest(models, tmp_path):
    """GPT-2's tied embedding is one array at two leaves, which XLA cannot donate twice,
    and one parameter: it gets the sum of both uses' gradients and stays tied, as in torch."""
    _, lm = models["gpt2"]
    ids = jnp.asarray(np.arange(6)[None] + 3)

    def loss_fn(params, ids):
        with lm.bind(params).trace(ids):
            logits = lm.lm_head.output.save()
        return nll(logits)

    optimizer = optax.sgd(0.1)
    params = jax.tree_util.tree_map(lambda x: x, lm.variables)  # the same arrays, tied included
    leaves = jax.tree_util.tree_leaves(params)
    assert len({id(x) for x in leaves}) == len(leaves) - 1  # lm_head.weight is wte.weight
    state = optimizer.init(params)
    grads = jax.grad(loss_fn)(params, ids)["params"]
    tied = grads["transformer"]["wte"]["weight"] + grads["lm_head"]["weight"]
    grads["transformer"]["wte"]["weight"] = grads["lm_head"]["weight"] = tied
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, {"params": grads})
    new, _, loss = jnnsight.train_step(loss_fn, optimizer)(params, state, ids)
    assert float(loss) == pytest.approx(float(loss_fn(params, ids)), rel=1e-6)
    for got, want in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert new["params"]["lm_head"]["weight"] is new["params"]["transformer"]["wte"]["weight"]
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(params))  # kept: tied
    # a run resumed from a checkpoint stays tied (it would train the two leaves apart)
    path = jnnsight.save_checkpoint(tmp_path / "tied", new)
    resumed = jnnsight.restore_checkpoint(path, like=new)["params"]
    assert resumed["lm_head"]["weight"] is resumed["transformer"]["wte"]["weight"]
    np.testing.assert_array_equal(resumed["lm_head"]["weight"], new["params"]["lm_head"]["weight"])
    # one parameter for an optimizer that looks across leaves: a global-norm clip counts it once
    tied = jnp.asarray([3.0, -4.0])
    clipped = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
    two = {"a": tied, "b": tied}
    new_two, _, _ = jnnsight.train_step(lambda p: jnp.sum(p["a"] * p["b"]), clipped)(
        two, clipped.init(two))
    one = {"w": jnp.asarray([3.0, -4.0])}
    new_one, _, _ = jnnsight.train_step(lambda p: jnp.sum(p["w"] * p["w"]), clipped)(
        one, clipped.init(one))
    np.testing.assert_allclose(new_two["a"], new_one["w"], rtol=1e-6)
    assert new_two["b"] is new_two["a"]
    # untied trainables are donated, as documented
    steer = SteeringVector(jnp.arange(8.0))
    optimizer = optax.adam(0.1)
    jnnsight.train_step(lambda s: jnp.sum(s.vector ** 2), optimizer)(steer, optimizer.init(steer))
    assert steer.vector.is_deleted()
    # a model traced with donated parameters says so, and what to trace with instead
    donated = jax.tree_util.tree_map(jnp.copy, lm.variables)
    donated["params"]["lm_head"]["weight"].delete()
    with pytest.raises(Exception, match="deleted") as error:
        with lm.bind(donated).trace(ids):
            lm.lm_head.output.save()
    assert any("lm.bind(new_params)" in note for note in getattr(error.value, "__notes__", ()))


def test_orbax_checkpoints_restore_interventions_and_optimizer_state(tmp_path):
    steer = SteeringVector(jnp.arange(8.0))
    optimizer = optax.adam(0.1)
    state = optimizer.init(steer)
    steer2, state2, _ = jnnsight.train_step(lambda s: jnp.sum(s.vector ** 2), optimizer)(steer, state)
    saved = {"steer": steer2, "opt_state": state2, "step": 1, "lr": 0.1}
    path = jnnsight.save_checkpoint(tmp_path / "step_1", saved)
    restored = jnnsight.restore_checkpoint(path, like=saved)
    assert isinstance(restored["steer"], SteeringVector)
    assert (restored["step"], restored["lr"]) == (1, 0.1)  # Python numbers stay numbers
    for x, y in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(saved), strict=True):
        np.testing.assert_array_equal(x, y)
    activations = {"layer_1": np.random.default_rng(0).normal(size=(16, 5, 64)).astype(np.float32)}
    jnnsight.save_checkpoint(tmp_path / "activations", activations)
    np.testing.assert_array_equal(
        jnnsight.restore_checkpoint(tmp_path / "activations")["layer_1"], activations["layer_1"])
    with pytest.raises(FileExistsError, match="exists"):
        jnnsight.save_checkpoint(path, saved)
    # saved on 8 devices, restored here on one: `like` says where the arrays go
    code = f"""
import jax, jax.numpy as jnp, jnnsight
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((8,), ("model",))
vector = jax.device_put(jnp.arange(64.0), NamedSharding(mesh, P("model")))
jnnsight.save_checkpoint({str(tmp_path / "sharded")!r}, {{"steer": jnnsight.SteeringVector(vector)}})
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    like = {"steer": SteeringVector.zeros(64)}
    restored = jnnsight.restore_checkpoint(tmp_path / "sharded", like=like)
    np.testing.assert_array_equal(restored["steer"].vector, np.arange(64.0))
    assert restored["steer"].vector.sharding == like["steer"].vector.sharding
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        jnnsight.restore_checkpoint(tmp_path / "missing")
