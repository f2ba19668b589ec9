"""ActivationStore: saved values of many traces appended to disk, read back equal to the
values kept in memory, from the same object and from a new one opened on the folder."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
    for name in ("layers/10", ".", "..", ".rows"):
        with pytest.raises(JnnsightError, match="cannot name"):
            store.append({name: np.zeros((2, 4))})
    with pytest.raises(JnnsightError, match="need the same number of rows"):
        store.append(h=np.zeros((4, 4), np.float32), labels=np.arange(3))
    with pytest.raises(JnnsightError, match="not an array"):
        store.append(h="text")
    with pytest.raises(JnnsightError, match="inside a JAX transformation"):
        jax.jit(lambda x: store.append(h=x))(np.zeros((2, 4), np.float32))
    with pytest.raises(KeyError, match="holds \\['h'\\]"):
        store["g"]
    store.append(labels=np.array([1, 0]))
    with pytest.raises(JnnsightError, match="holds int64"):
        store.append(h=np.ones((2, 4), np.float32), labels=np.array([0.5, 0.5]))
    for not_numbers in (np.array(["a", "b"]), np.array([None, 1], dtype=object)):
        with pytest.raises(JnnsightError, match="cannot hold"):
            store.append(h=np.ones((2, 4), np.float32), text=not_numbers)
    assert store["h"].shape == (2, 4)  # the refused batches wrote nothing, not even h
    view = store["labels"]
    store.append(labels=np.array([1, 1]))
    assert view.shape == (4,)  # a view taken earlier sees later rows


def test_reads_index_rows_as_numpy_does(tmp_path):
    store = ActivationStore(tmp_path / "index")
    rows = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    store.append(x=rows)
    stored = store["x"]
    perm = np.array([4, 0, 2, 2])
    for index in (slice(None, 10_000), slice(-3, None), slice(None, -1), slice(None, None, 2),
                  slice(None, None, -2), slice(4, 1, -1), slice(7, 9), slice(3, 1), -1, 0, 4,
                  (slice(1, 3), 2), (-2, slice(0, 2)), Ellipsis, (slice(None), -1),
                  (Ellipsis, -1), (-1, -1, -1), (slice(None), slice(None, None, -1), 1),
                  perm, [-1, 0], (perm, -1), (slice(None), [2, -3]), (1, slice(None), [0, -1]),
                  rows[:, 0, 0] > 20, (np.int64(-2), jnp.int32(1)), jnp.array([3, -5]),
                  (None, 1), (slice(None), None, 0), []):
        np.testing.assert_array_equal(stored[index], rows[index], err_msg=str(index))
    for index in (5, -6, [0, 5], np.array([-6])):
        with pytest.raises(IndexError, match="has 5 rows"):
            stored[index]
    for index, says in (((0, 3), "3 entries on axis 1"), ((0, 0, -5), "4 entries on axis 2"),
                        ((0, 0, 0, 0), "has 3 axes"), ((..., ...), "one `...`"),
                        (np.array([0.5]), "not ndarray of float"),
                        (np.array([True, False]), "boolean index of shape"),
                        (True, "boolean array")):
        with pytest.raises(IndexError, match=says):
            stored[index]


def _run(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_store_reopened_after_its_process_died_keeps_only_rows_known_to_be_on_disk(tmp_path):
    """Appended rows whose writes may not have ended read back as zeros once: they are dropped."""
    folder = tmp_path / "killed"
    _run(f"""
        import os, numpy as np
        from jnnsight import ActivationStore
        store = ActivationStore({str(folder)!r})
        store.append(x=np.ones((4, 3), np.float32))
        store.flush()
        store.append(x=np.full((5, 3), 2, np.float32), y=np.ones((5, 1)))
        os._exit(0)                     # as a kill: no flush, no exit handlers
    """)
    store = ActivationStore(folder)
    assert store.names == ["x", "y"] and len(store["x"]) == 4 and len(store["y"]) == 0
    np.testing.assert_array_equal(store["x"][:], np.ones((4, 3), np.float32))
    store.append(x=np.full((2, 3), 3, np.float32))  # a resumed run appends after them
    np.testing.assert_array_equal(store["x"][4:], np.full((2, 3), 3, np.float32))
    _run(f"""
        import numpy as np
        from jnnsight import ActivationStore
        ActivationStore({str(folder)!r}).append(x=np.full((1, 3), 4, np.float32))
    """)                                # a normal exit flushes
    assert len(ActivationStore(folder)["x"]) == 4 + 2 + 1


def test_a_second_store_of_a_folder_retires_the_first(tmp_path):
    """A notebook cell run again opens the folder anew: the older store's appends would
    write over the newer's rows, so the older one flushes and refuses further use."""
    first = ActivationStore(tmp_path / "acts")
    first.append(x=np.zeros((2, 3), np.float32))          # not flushed yet
    second = ActivationStore(tmp_path / "acts")
    assert len(second["x"]) == 2                           # the first's rows, flushed
    second.append(x=np.ones((1, 3), np.float32))
    for use in (lambda: first.append(x=np.ones((1, 3), np.float32)), lambda: first["x"][:]):
        with pytest.raises(JnnsightError, match="retired") as caught:
            use()
        assert "test_activations.py" in str(caught.value).splitlines()[0]
    del first                                              # its flush must not undo the record
    second.flush()
    np.testing.assert_array_equal(ActivationStore(tmp_path / "acts")["x"][:],
                                  [[0, 0, 0], [0, 0, 0], [1, 1, 1]])
