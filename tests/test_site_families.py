"""Site tables of new input sizes instantiated from one symbolic discovery: equal to a
discovery of each shape on its own, with the model traced no more for a third shape;
shape-by-shape discovery where a model does not declare it or cannot run on symbolic
sizes; an error, never a dropped write, where a model declares it wrongly."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jnnsight.nnsight
from conftest import reference, tiny_language_model
from jnnsight import NNsight
from jnnsight.errors import JnnsightError
from jnnsight.tracing.collate import Batch
from jnnsight.tracing.discover import discover, with_batch_axes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: tiny_language_model(name, root / name)[1] for name in ("gpt2", "mistral_window")}


@pytest.fixture
def discoveries(monkeypatch):
    """Counts the model traces discovery makes."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return discover(*args, **kwargs)

    monkeypatch.setattr(jnnsight.nnsight, "discover", counting)
    return calls


def sites(table):
    return [(s.key, s.treedef, s.leaves, s.batched) for s in table.sites]


def concrete(model, batch: Batch):
    """Discovery of this one shape (batch axes measured where invokes split the batch)."""
    table = discover(model.module, model.variables, batch.args, batch.kwargs)
    if not all(rows.whole for rows in batch.rows):
        table = with_batch_axes(table, model.module, model.variables, batch.args, batch.kwargs,
                                batch.rows[0].size)
    return table


def layers(lm):
    return lm.transformer.h if "transformer" in dir(lm) else lm.model.layers


def halve(path, call, out):
    """Layer 1's hidden state times 0.5, by hand."""
    return (out[0] * 0.5, *out[1:]) if path[-1:] in (("h_1",), ("layers_1",)) else out


@pytest.mark.parametrize("name", ["gpt2", "mistral_window"])
def test_tables_of_new_lengths_equal_their_own_discovery_and_cost_no_trace(models, name, discoveries):
    lm = models[name]
    for length in (5, 6, 7, 9, 3):
        ids = np.arange(length)[None] + 10
        with lm.trace(ids):
            h = layers(lm)[0].output[0].save()
            layers(lm)[1].output[0] = layers(lm)[1].output[0] * 0.5
            logits = lm.lm_head.output.save()
        batch = lm._collate([((ids,), {})], [None])
        assert sites(lm._site_table(lm.variables, batch)[1]) == sites(concrete(lm, batch))
        # the same numbers as a forward with the edit written by hand
        out, _ = reference(lm, jnp.asarray(ids), attention_mask=jnp.ones_like(ids), edit=halve)
        np.testing.assert_allclose(logits, out.logits, atol=1e-5)
        assert h.shape == (1, length, h.shape[-1])
    # lengths 5 and 6 were discovered (the second symbolically); 7, 9 and 3 were not
    assert len(discoveries) == 2


def test_split_batches_get_the_batch_axes_a_measured_discovery_gives(models, discoveries):
    lm = models["gpt2"]
    for a, b in ((4, 6), (5, 8), (3, 9), (7, 2)):
        with lm.trace() as tracer:
            with tracer.invoke(np.arange(a) + 10):
                x = layers(lm)[0].output[0].save()
            with tracer.invoke(np.arange(b) + 20):
                y = layers(lm)[0].output[0].save()
        assert x.shape[0] == y.shape[0] == 1
        batch = lm._collate([((np.arange(a) + 10,), {}), ((np.arange(b) + 20,), {})], [None, None])
        assert sites(lm._site_table(lm.variables, batch)[1]) == sites(concrete(lm, batch))
    # the first pair is discovered (with a second pass for batch axes), the second
    # symbolically; the other two cost no trace
    assert len(discoveries) == 2


class Plain(nn.Module):
    """A module that does not declare its sites independent of sizes."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="proj")(x)


class ShapeBound(nn.Module):
    """Declares size-independent sites, but needs concrete sizes: NumPy on a shape."""

    jnnsight_symbolic_sizes: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="proj")(x)
        return x + np.arange(x.shape[1])[None, :, None]


class SizeProbing(nn.Module):
    """Declares size-independent sites, yet has more of them where a size converts to int
    (symbolic ones do not): the check against the first shape catches it."""

    jnnsight_symbolic_sizes: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x):
        try:
            int(x.shape[1])
            concrete = True
        except Exception:  # noqa: BLE001
            concrete = False
        x = nn.Dense(4, name="proj")(x)
        return nn.Dense(4, name="extra")(x) if concrete else x


@pytest.mark.parametrize("module, traces", [(Plain(), 4), (ShapeBound(), 5), (SizeProbing(), 5)])
def test_models_that_need_concrete_sizes_are_discovered_shape_by_shape(module, traces, discoveries):
    model = NNsight(module, module.init(jax.random.key(0), jnp.ones((2, 3, 4))))
    for length in (3, 5, 6, 7):
        x = jnp.ones((2, length, 4)) * jnp.arange(length)[None, :, None]
        with model.trace(x):
            h = model.proj.output.save()
            out = model.output.save()
        np.testing.assert_allclose(out, module.apply(model.variables, x), atol=1e-6)
        assert h.shape == (2, length, 4)
    assert len(discoveries) == traces  # 4 shapes, and one symbolic try where declared


class Aligned(nn.Module):
    """Declares size-independent sites but calls `block` again at unaligned lengths: JAX
    decides `length % 4 != 0` True for a symbolic length, so the family's table is wrong
    at length 8, and the run-time check says so instead of dropping the write."""

    jnnsight_symbolic_sizes: ClassVar[bool] = True

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(10, 3, name="embed")(ids)
        block = nn.Dense(3, name="block")
        h = block(h)
        if ids.shape[1] % 4 != 0:
            h = block(h)
        return nn.Dense(3, name="out")(h)


def test_a_wrongly_declared_model_gets_an_error_not_a_dropped_write():
    module = Aligned()
    model = NNsight(module, module.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))
    for length in (5, 6, 7, 8):
        ids = (jnp.arange(2 * length).reshape(2, length) % 10).astype(jnp.int32)
        with pytest.raises(JnnsightError, match="jnnsight_symbolic_sizes") if length == 8 else nullcontext():
            with model.trace(ids):
                model.block.next().output = jnp.zeros((2, length, 3))
                edited = model.output.save()
            params = model.variables["params"]["out"]
            np.testing.assert_allclose(edited, jnp.broadcast_to(params["bias"], edited.shape), atol=1e-6)
