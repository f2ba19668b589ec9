"""Saved activations of many traces on disk: appended batch by batch, read back lazily.

A loop over a dataset saves a site per batch; an :class:`ActivationStore` appends
each batch's rows to one zarr array per name (written by tensorstore, which orbax
also uses), so the collection can be far larger than memory. Writes run in the
background while the next batch computes; reads take any slice of rows without
loading the rest.

Example::

    >>> store = ActivationStore("runs/acts")
    >>> for ids in batches:
    ...     with lm.trace(ids):
    ...         h = lm.model.layers[10].output[0][:, -1].save()
    ...     store.append(layer_10=h)
    >>> store.flush()
    >>> store["layer_10"][:1000]            # numpy, read from disk
"""

from __future__ import annotations

import atexit
import json
import os
import re
import weakref
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .errors import JnnsightError, at_user_line
from .tracing.discover import is_int

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_CHUNK_BYTES = 8 << 20  # rows per zarr chunk: about 8 MiB of them
_COMMITTED = ".rows.json"  # rows per name on disk as of the last flush (no array's name)


# The store of each folder this process has open: a newer one retires the older (a cell
# run again in a notebook), whose appends would otherwise write over the newer's rows.
_OPEN: dict[Path, "weakref.ref[ActivationStore]"] = {}


def _flush_at_exit(store: "weakref.ref[ActivationStore]") -> None:
    alive = store()
    if alive is not None:
        alive.flush()


def _tensorstore() -> Any:
    import tensorstore

    return tensorstore


class StoredArray:
    """One name's rows on disk: ``shape``, ``dtype``, and numpy slices on indexing
    (rows appended after it was taken included).

    Example::

        >>> store["layer_10"].shape           # (rows, *row shape)
        >>> store["layer_10"][128:256]         # numpy, read from disk
    """

    def __init__(self, store: "ActivationStore", name: str):
        self._store, self._name = store, name

    @property
    def _array(self) -> Any:
        """The store's current handle: rows appended later are seen."""
        self._store._check_open()
        self._store.flush()
        return self._store._arrays[self._name]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array.dtype.numpy_dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        """What numpy indexing gives, read from disk: negative indices, slices past the
        end, steps, ``...``, ``None``, and integer or boolean arrays on any axis.

        Example::

            >>> store["h"][-8:, -1]               # the last position of the last 8 rows
            >>> store["h"][np.array([5, 0, 2])]   # rows in any order (a shuffled batch)
        """
        array = self._array  # (one flush per read)
        shape = tuple(int(n) for n in array.shape)
        return np.asarray(array[self._normalized(index, shape)].read().result())

    def _normalized(self, index: Any, shape: tuple[int, ...]) -> tuple:
        """``index`` with each entry in the axis's range, as tensorstore takes it."""
        entries = index if isinstance(index, tuple) else (index,)
        taken = sum(_axes_taken(e) for e in entries)
        if taken > len(shape):
            raise IndexError(f"{taken} indices for {self._name!r}, which has {len(shape)} axes "
                             f"(shape {shape}).")
        if sum(e is Ellipsis for e in entries) > 1:
            raise IndexError("an index can hold only one `...`.")
        # tensorstore puts an integer's axis where numpy would not when arrays index too;
        # as a 0-d array it follows numpy's rule for mixed integer and array indices
        arrays = any(_axes_taken(e) and not is_int(e) and not isinstance(e, slice)
                     for e in entries)
        out: list[Any] = []
        axis = 0
        for entry in entries:
            if entry is Ellipsis:
                out.extend([slice(None)] * (len(shape) - taken))
                axis += len(shape) - taken
            elif entry is None:
                out.append(_tensorstore().newaxis)
            else:
                normal = self._axis_index(entry, axis, shape)
                out.append(np.asarray(normal) if arrays and is_int(normal) else normal)
                axis += _axes_taken(entry)
        return tuple(out)

    def _axis_index(self, entry: Any, axis: int, shape: tuple[int, ...]) -> Any:
        n = shape[axis]
        where = "row" if axis == 0 else f"index on axis {axis}"
        has = f"{n} rows" if axis == 0 else f"{n} entries on axis {axis}"
        if isinstance(entry, slice):
            start, stop, step = entry.indices(n)
            if not range(start, stop, step):
                return slice(0, 0)
            return slice(start, None if stop < 0 else stop, step)
        if isinstance(entry, (bool, np.bool_)):
            raise IndexError(f"{self._name!r} takes a boolean array as an index, not the "
                             f"scalar {entry!r}.")
        if is_int(entry) or (hasattr(entry, "__index__") and np.ndim(entry) == 0):
            i = int(entry)
            if not -n <= i < n:
                raise IndexError(f"{where} {i} is out of range: {self._name!r} has {has}.")
            return i % n
        array = np.asarray(entry)
        if array.size == 0 and array.dtype != bool:  # `[]`: no rows, as in numpy
            array = array.astype(np.int64)
        if array.dtype == bool:
            if array.shape != shape[axis:axis + array.ndim]:
                raise IndexError(f"a boolean index of shape {list(array.shape)} on axes from "
                                 f"{axis}, where {self._name!r} has {list(shape[axis:])}.")
            return array
        if not np.issubdtype(array.dtype, np.integer):
            raise IndexError(f"{self._name!r} is indexed by integers, slices, `...`, `None` and "
                             f"integer or boolean arrays, not {type(entry).__name__} "
                             f"of {array.dtype}.")
        if array.size and not (-n <= array.min() and array.max() < n):
            raise IndexError(f"{where} indices reach {array.min()}..{array.max()}: "
                             f"{self._name!r} has {has}.")
        return array % n if n else array

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype)

    def __repr__(self) -> str:
        return f"StoredArray(shape={self.shape}, dtype={self.dtype})"


def _axes_taken(entry: Any) -> int:
    """How many of the array's axes one entry of an index consumes."""
    if entry is None or entry is Ellipsis:
        return 0
    if isinstance(entry, (slice, int, np.integer)):
        return 1
    array = np.asarray(entry)
    return array.ndim if array.dtype == bool else 1


class ActivationStore:
    """A folder of growing arrays, one per name, each appended along axis 0.

    ``ActivationStore(path)`` creates the folder or opens the arrays already in
    it, so a run can resume. Each name keeps the row shape and dtype of its first
    batch; later batches must match (a clear error says how when they do not).
    Only the process that appends writes: in a multi-host run, gather a value
    first (``.save(gather=True)``) and append on one process. In one process, a
    new store of a folder flushes and retires the one open before (using it is
    then an error): two would write over each other's rows.

    Example::

        >>> store = ActivationStore("runs/acts")
        >>> store.append(layer_10=h, labels=labels)     # rows along axis 0
        >>> store.flush()                               # wait for the writes
        >>> store.names, len(store["labels"])
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()
        self.path.mkdir(parents=True, exist_ok=True)
        self._arrays: dict[str, Any] = {}
        self._pending: list[Any] = []
        self._retired = False
        previous = _OPEN.get(self.path)
        if previous is not None and previous() is not None:
            previous()._retire()
        _OPEN[self.path] = weakref.ref(self)
        ts = _tensorstore()
        committed = self._committed()
        for folder in sorted(p for p in self.path.iterdir() if (p / "zarr.json").exists()):
            array = ts.open(self._spec(folder.name)).result()
            rows = committed.get(folder.name, 0) if committed is not None else int(array.shape[0])
            if rows < array.shape[0]:  # appended, then the process died before the rows were on disk
                array = array.resize(exclusive_max=[rows, *array.shape[1:]],
                                     resize_metadata_only=True).result()
            self._arrays[folder.name] = array
        atexit.register(_flush_at_exit, weakref.ref(self))

    def _committed(self) -> dict[str, int] | None:
        """Rows per name known to be on disk (None for a store written before this record)."""
        file = self.path / _COMMITTED
        return json.loads(file.read_text()) if file.exists() else None

    def _spec(self, name: str) -> dict:
        return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)}}

    @property
    def names(self) -> list[str]:
        return sorted(self._arrays)

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def __getitem__(self, name: str) -> StoredArray:
        if name not in self._arrays:
            raise KeyError(f"{name!r} is not in {self.path}; it holds {self.names}.")
        return StoredArray(self, name)

    def append(self, values: dict[str, Any] | None = None, **named: Any) -> None:
        """Append each value's rows (axis 0) to the array of its name.

        The rows are copied before this returns; writing them to disk goes on in
        the background until :meth:`flush` (or a read) waits for it.
        """
        self._check_open()
        batch = {**(values or {}), **named}
        rows = {name: self._host(name, value) for name, value in batch.items()}
        counts = {name: value.shape[0] for name, value in rows.items()}
        if len(set(counts.values())) > 1:
            raise JnnsightError(at_user_line(
                f"one append's values are rows of the same examples, so they need the same "
                f"number of rows (axis 0); these have {counts}. Append them separately if "
                "they are not aligned."
            ))
        for name, value in rows.items():  # every name checked before anything is written
            if name in self._arrays:
                self._check(name, self._arrays[name], value)
            else:
                self._check_storable(name, value)
        for name, value in rows.items():
            array = self._arrays.get(name)
            if array is None:
                array = self._arrays[name] = self._create(name, value)
            start = int(array.shape[0])
            array = array.resize(exclusive_max=[start + value.shape[0], *array.shape[1:]],
                                 resize_metadata_only=True, expand_only=True).result()
            self._arrays[name] = array
            write = array[start:start + value.shape[0]].write(value)
            write.copy.result()
            self._pending.append(write.commit)

    def flush(self) -> None:
        """Wait until every appended row is on disk, and record the row counts.

        A store reopened after a process died keeps the rows of its last flush (also
        run when the store is dropped and when the interpreter exits normally), not rows
        whose writes never ended.
        """
        pending, self._pending = self._pending, []
        for commit in pending:
            commit.result()
        if self._retired:  # the newer store keeps the record
            return
        counts = {name: int(array.shape[0]) for name, array in self._arrays.items()}
        temporary = self.path / f"{_COMMITTED}.tmp"
        temporary.write_text(json.dumps(counts))
        os.replace(temporary, self.path / _COMMITTED)

    def _retire(self) -> None:
        if self._pending:  # (with none, its record may be older than the folder's)
            self.flush()
        self._retired = True

    def _check_open(self) -> None:
        if self._retired:
            raise JnnsightError(at_user_line(
                f"this ActivationStore of {self.path} was retired when a newer one opened the "
                "folder in this process: use the newer one (two would write over each other's "
                "rows)."
            ))

    def __del__(self) -> None:
        if getattr(self, "_pending", None):  # dropped without flush (a temporary, a local)
            self.flush()

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {list(a.shape)}" for n, a in sorted(self._arrays.items()))
        return f"ActivationStore({str(self.path)!r}, {{{shapes}}})"

    # -- checks ---------------------------------------------------------------------------

    def _host(self, name: str, value: Any) -> np.ndarray:
        if not _NAME.match(name) or name.startswith("."):
            raise JnnsightError(at_user_line(
                f"{name!r} cannot name a stored array: use letters, digits, '_', '.' or '-', "
                "not starting with '.'."
            ))
        if isinstance(value, jax.core.Tracer):
            raise JnnsightError(at_user_line(
                f"{name!r} is a value inside a JAX transformation (`jax.jit`, a block's body); "
                "append the saved values after the block, outside jitted code."
            ))
        if not isinstance(value, (jax.Array, np.ndarray, np.generic, list, tuple, int, float)):
            raise JnnsightError(at_user_line(
                f"{name!r} is a {type(value).__name__}, not an array: append values saved "
                "in a block (`.save()`), after the block."
            ))
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            raise JnnsightError(at_user_line(
                f"{name!r} spans devices of other processes: gather it first "
                "(`.save(gather=True)` or `jax.experimental.multihost_utils.process_allgather`) "
                "and append on one process."
            ))
        array = np.asarray(jax.device_get(value))
        if array.ndim == 0:
            raise JnnsightError(at_user_line(
                f"{name!r} is a scalar: stored arrays grow along axis 0, the rows. Append "
                "`value[None]` for one row."
            ))
        return array

    def _create(self, name: str, value: np.ndarray) -> Any:
        ts = _tensorstore()
        row_bytes = max(1, int(np.prod(value.shape[1:], dtype=np.int64)) * value.dtype.itemsize)
        chunk = [max(1, _CHUNK_BYTES // row_bytes), *value.shape[1:]]
        return ts.open(self._spec(name), create=True, dtype=ts.dtype(value.dtype.name),
                       shape=[0, *value.shape[1:]],
                       chunk_layout=ts.ChunkLayout(chunk_shape=chunk)).result()

    def _check_storable(self, name: str, value: np.ndarray) -> None:
        try:
            _tensorstore().dtype(value.dtype.name)
        except ValueError:
            raise JnnsightError(at_user_line(
                f"{name!r} is an array of {value.dtype}, which a stored array cannot hold: "
                "append numbers (int, float, bool); keep strings in a file of their own."
            )) from None

    def _check(self, name: str, array: Any, value: np.ndarray) -> None:
        row, dtype = tuple(int(n) for n in array.shape[1:]), np.dtype(array.dtype.numpy_dtype)
        if tuple(value.shape[1:]) != row:
            raise JnnsightError(at_user_line(
                f"{name!r} holds rows of shape {list(row)}; this batch's rows are "
                f"{list(value.shape[1:])}. Rows of one name share a shape: save a fixed "
                "position (`output[0][:, -1]`), or pad every batch to one length (a "
                "`pad_to_multiple_of` at least the dataset's longest prompt), or append "
                "under another name."
            ))
        if value.dtype != dtype:
            raise JnnsightError(at_user_line(
                f"{name!r} holds {dtype}; this batch is {value.dtype}. Cast it "
                f"(`np.asarray(value).astype(np.{dtype})`) or append under another name."
            ))


__all__ = ["ActivationStore", "StoredArray"]
