"""ActivationStore: saved values of many traces appended to disk, read back equal to the
values kept in memory, from the same object and from a new one opened on the folder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jnnsight import ActivationStore
from jnnsight.errors import JnnsightError

BATCHES = [np.random.default_rng(i).integers(0, 32, (2, 6)) for i in range(4)]


def test_rows_of_many_traces_read_back_equal_to_the_saved_values(toy, tmp_path):
    model, _ = toy
    kept_h, kept_last = [], []
    with ActivationStore(tmp_path / "acts") as store:
        for ids in BATCHES:
            with model.trace(ids):
                h = model.h[1].output[0].save()
                last = model.h[1].output[0][:, -1].save()
            store.append(block_1=h, last=last)
            kept_h.append(np.asarray(h))
            kept_last.append(np.asarray(last))
        assert store["block_1"].shape == (8, 6, 16)
        np.testing.assert_array_equal(store["block_1"][:], np.concatenate(kept_h))
    reopened = ActivationStore(tmp_path / "acts")
    assert reopened.names == ["block_1", "last"]
    np.testing.assert_array_equal(reopened["last"][3:7], np.concatenate(kept_last)[3:7])
    np.testing.assert_array_equal(np.asarray(reopened["last"]), np.concatenate(kept_last))
    reopened.append({"last": kept_last[0]})  # a resumed run appends after the existing rows
    np.testing.assert_array_equal(reopened["last"][8:], kept_last[0])


def test_bfloat16_and_integer_rows_keep_their_dtype(tmp_path):
    store = ActivationStore(tmp_path / "typed")
    half = jnp.arange(12, dtype=jnp.bfloat16).reshape(3, 4) / 3
    labels = np.array([1, 0, 1])
    store.append(half=half, labels=labels)
    store.append(half=half, labels=labels)
    assert store["half"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(store["half"][3:], np.asarray(half))
    np.testing.assert_array_equal(store["labels"][:], np.concatenate([labels, labels]))


def test_bad_appends_get_clear_errors(tmp_path):
    store = ActivationStore(tmp_path / "bad")
    store.append(h=np.zeros((2, 4), np.float32))
    with pytest.raises(JnnsightError, match="rows of shape \\[4\\]"):
        store.append(h=np.zeros((2, 5), np.float32))
    with pytest.raises(JnnsightError, match="holds float32"):
        store.append(h=np.zeros((2, 4), np.float64))
    with pytest.raises(JnnsightError, match="scalar"):
        store.append(loss=np.float32(1.0))
    with pytest.raises(JnnsightError, match="cannot name"):
        store.append({"layers/10": np.zeros((2, 4))})
    with pytest.raises(JnnsightError, match="not an array"):
        store.append(h="text")
    with pytest.raises(JnnsightError, match="inside a JAX transformation"):
        jax.jit(lambda x: store.append(h=x))(np.zeros((2, 4), np.float32))
    with pytest.raises(KeyError, match="holds \\['h'\\]"):
        store["g"]
    store.append(labels=np.array([1, 0]))
    with pytest.raises(JnnsightError, match="holds int64"):
        store.append(h=np.ones((2, 4), np.float32), labels=np.array([0.5, 0.5]))
    assert store["h"].shape == (2, 4)  # the refused batches wrote nothing, not even h
    view = store["labels"]
    store.append(labels=np.array([1, 1]))
    assert view.shape == (4,)  # a view taken earlier sees later rows
