"""Where a checkpoint lives, and reading its ``config.json`` and safetensors.

A checkpoint is named the way ``transformers`` names one: a local folder
(``config.json`` plus ``*.safetensors``), a ``.gguf`` file, or a Hugging Face
hub id, which is looked up in the hub cache first and downloaded only when
it is not there and downloads are allowed. No torch is needed: tensors come
back as numpy arrays under their checkpoint keys (PyTorch names and layouts).

Example::

    >>> folder = resolve("HuggingFaceTB/SmolLM2-135M")   # or a folder, or a .gguf file
    >>> config = load_config(folder)
    >>> tensors = load_safetensors(folder, dtype="float32")
    >>> tensors["model.layers.0.self_attn.q_proj.weight"].shape
    (576, 576)

bfloat16: numpy has no bfloat16 of its own. safetensors 0.8 (``framework="numpy"``)
asks numpy for the dtype named ``"bfloat16"``, which exists only once
``ml_dtypes`` is imported (this module imports it), so bf16 tensors come back
as ``ml_dtypes.bfloat16`` arrays, which ``jnp.asarray`` takes as
``jnp.bfloat16`` without a copy through float32. Dtypes numpy still does not
know are read from the raw bytes (:func:`_read_raw`).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import ml_dtypes  # noqa: F401  (registers "bfloat16" and the float8 names with numpy)
import numpy as np

from ..errors import JnnsightError

#: What a hub snapshot needs: configs, weights, tokenizers and chat templates.
HUB_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.jinja",
)
#: Copies of the same weights some repositories carry in another layout.
HUB_IGNORE = ("original/*", "consolidated*.safetensors", "*/consolidated*.safetensors")

#: Below this many bytes no progress bar is shown.
PROGRESS_MIN_BYTES = 256 * 2**20

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
    "I64": np.int64,
    "U64": np.uint64,
    "I32": np.int32,
    "U32": np.uint32,
    "I16": np.int16,
    "U16": np.uint16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(JnnsightError):
    """A checkpoint is malformed or not of a kind jnnsight reads."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint is not on disk, not in the hub cache, and could not be downloaded."""


# --------------------------------------------------------------------------- resolve


def resolve(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    gguf_file: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder (or ``.gguf`` file) that holds a checkpoint.

    - An existing folder is returned as is (with ``gguf_file``: that file in it; a
      folder with no ``config.json`` and one ``.gguf`` file: that file).
    - An existing ``.gguf`` file is returned as is.
    - Anything else is a Hugging Face hub id. The hub cache is searched first
      (``local_files_only``); when the snapshot is absent it is downloaded,
      unless ``HF_HUB_OFFLINE=1``. Only configs, safetensors and tokenizer files
      are fetched; ``gguf_file`` fetches that one GGUF file instead of the
      safetensors and returns its path.

    Raises :class:`CheckpointNotFoundError` saying what was looked for, where
    the cache is, and how to get the checkpoint there.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if gguf_file is None:
            return _gguf_alone(path) or path.absolute()
        file = path / gguf_file
        if not file.is_file():
            raise CheckpointNotFoundError(
                f"The folder {path} has no file {gguf_file!r}. "
                f"GGUF files there: {_names(path.glob('*.gguf'))}."
            )
        return file.absolute()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path.absolute()
        raise CheckpointError(
            f"{path} is a file but not a .gguf file. Pass the folder that holds config.json "
            f"and the *.safetensors files ({path.parent}), or a .gguf file."
        )
    if _looks_like_path(text):
        raise CheckpointNotFoundError(
            f"No such file or folder: {text!r}. Pass an existing folder with config.json and "
            "*.safetensors, a .gguf file, or a Hugging Face hub id such as "
            "'HuggingFaceTB/SmolLM2-135M'."
        )
    return _resolve_hub(text, revision, gguf_file=gguf_file, cache_dir=cache_dir, token=token)


def _gguf_alone(folder: Path) -> Path | None:
    """A folder's only ``.gguf`` file where it has no ``config.json``; None where it has one."""
    if (folder / "config.json").is_file():
        return None
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) > 1:
        raise CheckpointNotFoundError(
            f"{folder} has no config.json and several GGUF files ({_names(ggufs)}): pass "
            "one's path, or gguf_file='<name>'."
        )
    return ggufs[0].absolute() if ggufs else None


def _looks_like_path(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.lower().endswith(".gguf") or text.startswith(("/", ".", "~", "\\")):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


def hub_offline() -> bool:
    """Whether hub downloads are switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``).

    Read from the environment at each call (huggingface_hub reads it once, at import).
    """
    from huggingface_hub import constants

    def truthy(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return bool(constants.HF_HUB_OFFLINE) or truthy("HF_HUB_OFFLINE") or truthy("TRANSFORMERS_OFFLINE")


def _resolve_hub(
    repo_id: str,
    revision: str | None,
    *,
    gguf_file: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
) -> Path:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    if gguf_file is None:
        allow, ignore = list(HUB_PATTERNS), list(HUB_IGNORE)
    else:
        allow, ignore = [p for p in HUB_PATTERNS if p != "*.safetensors"] + [gguf_file], None
    kwargs = dict(
        revision=revision,
        cache_dir=cache_dir,
        allow_patterns=allow,
        ignore_patterns=ignore,
        token=token,
        library_name="jnnsight",
    )

    def found(folder: str) -> Path:
        folder = Path(folder)
        if gguf_file is None:
            return folder
        if not (folder / gguf_file).is_file():
            raise CheckpointNotFoundError(
                f"The hub repository {repo_id!r} has no file {gguf_file!r}. "
                f"GGUF files there: {_names(folder.glob('*.gguf'))}."
            )
        return folder / gguf_file

    cached: Path | None = None
    try:
        cached = Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        pass  # not cached (or cached in part): download, where allowed
    if cached is not None and _has_weights(cached, gguf_file):
        return found(cached)

    what = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    if gguf_file is not None:
        what += f", file {gguf_file!r}"
    fixes = (
        "To fix it, do one of:\n"
        f"  - download it once while online (`hf download {repo_id}"
        + (f" {gguf_file}" if gguf_file else "")
        + (f" --revision {revision}" if revision else "")
        + "`), then run offline from the cache;\n"
        "  - pass a local folder that holds config.json and the *.safetensors files;\n"
        "  - pass the path of a .gguf file."
    )
    if hub_offline() and cached is not None:
        if gguf_file is not None:
            return found(cached)  # (which names the GGUF files there)
        raise CheckpointNotFoundError(
            f"The Hugging Face cache at {cache} holds {what} in part, without "
            f"config.json and safetensors weights together (files there: "
            f"{_names(cached.iterdir())}): a download that stopped part way, or a "
            "repository with PyTorch .bin weights only (jnnsight reads safetensors). "
            "Downloads are switched off (HF_HUB_OFFLINE=1).\n" + fixes
        )
    if hub_offline():
        raise CheckpointNotFoundError(
            f"Could not find the checkpoint {what}: it is not a local folder or .gguf file, "
            f"and the Hugging Face cache at {cache} has no complete snapshot of it. "
            "Downloads are switched off (HF_HUB_OFFLINE=1).\n" + fixes
        )
    try:
        downloaded = huggingface_hub.snapshot_download(repo_id, **kwargs)
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        if cached is not None:  # a cached snapshot without weights: the loaders say what is missing
            return found(cached)
        gated = isinstance(error, GatedRepoError)
        reason = (
            "the repository is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
            if gated
            else "the hub has no such repository or revision (or it is private: log in with `hf auth login`)"
        )
        raise CheckpointNotFoundError(
            f"Could not find the checkpoint {what}: it is not a local folder or .gguf file, "
            f"it is not in the Hugging Face cache at {cache}, and {reason}.\n" + fixes
        ) from error
    except Exception as error:  # the network: OSError subclasses, or the HTTP client's own errors
        if not isinstance(error, OSError) and not type(error).__module__.startswith(("httpx", "httpcore")):
            raise
        if cached is not None:
            return found(cached)
        raise CheckpointNotFoundError(
            f"Could not find the checkpoint {what}: it is not a local folder or .gguf file, "
            f"the Hugging Face cache at {cache} has no complete snapshot of it, and the hub "
            f"could not be reached ({type(error).__name__}: {error}).\n" + fixes
        ) from error
    return found(downloaded)


def _has_weights(folder: Path, gguf_file: str | None) -> bool:
    if gguf_file is not None:
        return (folder / gguf_file).is_file()
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _names(paths: Iterable[Path]) -> str:
    names = sorted(p.name for p in paths)
    return ", ".join(names) if names else "none"


# --------------------------------------------------------------------------- config


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config as a dict: ``config.json`` of a folder, or a GGUF file's metadata.

    For a ``.gguf`` file the dict has Hugging Face names (see
    :func:`jnnsight.loading.gguf_file.gguf_config`); only the metadata is read.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf_file import gguf_config

        return gguf_config(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        where = path if path.is_dir() else path.parent
        raise CheckpointNotFoundError(
            f"No config.json in {where} (files there: {_names(where.iterdir()) if where.is_dir() else 'none'}). "
            "A checkpoint folder needs the config.json that `save_pretrained` writes."
        )
    return json_object(file)


def json_object(file: Path) -> dict[str, Any]:
    """A JSON file holding an object (``config.json``, ``generation_config.json``), as a dict."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}.") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a {type(value).__name__}, not a JSON object.")
    return value


# --------------------------------------------------------------------------- safetensors


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint, in shard order.

    ``path`` is a ``.safetensors`` file, or a folder with ``model.safetensors``,
    or with ``model.safetensors.index.json`` (sharded; its ``weight_map`` names
    the shards), or with exactly one other ``*.safetensors`` file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointNotFoundError(f"No such folder or file: {path}.")
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointNotFoundError(
                f"{index} names shards that are not in {path}: {', '.join(missing)}. "
                "The download is incomplete: download the checkpoint again."
            )
        return [path / s for s in sorted(shards)]
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise CheckpointError(
            f"{path} holds several .safetensors files ({_names(found)}) but no "
            "model.safetensors.index.json to say which tensors each holds. Pass one file, "
            "or add the index that `save_pretrained` writes."
        )
    raise CheckpointNotFoundError(
        f"No safetensors weights in {path} (files there: {_names(path.iterdir())}). "
        "jnnsight reads model.safetensors or a sharded model.safetensors.index.json; "
        "convert a PyTorch .bin checkpoint with `save_pretrained(..., safe_serialization=True)`, "
        "or pass a .gguf file."
    )


@contextmanager
def _opened(file: Path) -> Iterator[Any]:
    """``safe_open`` of one file, numpy arrays; a cut or foreign file is a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(file, framework="numpy")
    except SafetensorError as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}). A download that stopped "
            "early leaves such a file: download it again."
        ) from err
    with handle as f:
        yield f


def load_safetensors(
    path: str | os.PathLike,
    dtype: Any = None,
    *,
    progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors checkpoint, as numpy arrays under their checkpoint keys.

    ``path`` is a folder (single file or sharded with an index) or one
    ``.safetensors`` file. ``dtype`` (``"float32"``, ``np.float32``,
    ``jnp.bfloat16``, ``"bfloat16"``, ...) casts the floating-point tensors;
    integer and boolean tensors keep their dtype; ``None`` keeps what is stored
    (bf16 as ``ml_dtypes.bfloat16``). ``progress``: ``None`` shows a bar for
    checkpoints over 256 MiB when stderr is a terminal (or in a notebook).
    """
    target = _float_dtype(dtype)
    files = safetensors_files(path)
    total = sum(f.stat().st_size for f in files)
    tensors: dict[str, np.ndarray] = {}
    with _progress_bar(total, "Loading safetensors", progress) as bar:
        for file in files:
            with _opened(file) as f:
                for key in f.keys():
                    try:
                        array = f.get_tensor(key)
                    except TypeError:  # a dtype numpy does not know: read the bytes
                        array = _read_raw(file, key)
                    tensors[key] = _cast(array, target)
                    bar.update(array.nbytes)
    return tensors


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of a safetensors file, read when asked.

    Example::

        >>> tensor = lazy_safetensors("model/")["lm_head.weight"]
        >>> tensor.shape, tensor.read().dtype
    """

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype | None  # None: a type jnnsight cannot read (reading it says so)

    def read(self, rows: slice = slice(None), columns: slice = slice(None)) -> np.ndarray:
        """The tensor's ``rows`` and ``columns`` (slices of axes 0 and 1, by default
        all), read with plain file reads of just their bytes (no memory map stays
        behind): one range for rows, one range per row for columns."""
        return _read_raw(self.file, self.key, rows, columns)


def lazy_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors checkpoint, unread: keys, files and shapes only."""
    tensors: dict[str, LazyTensor] = {}
    for file in safetensors_files(path):
        with _opened(file) as f:
            for key in f.keys():
                part = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
                tensors[key] = LazyTensor(file, key, tuple(part.get_shape()),
                                          None if dtype is None else np.dtype(dtype))
    return tensors


def _read_raw(file: Path, key: str, rows: slice = slice(None),
              columns: slice = slice(None)) -> np.ndarray:
    """One tensor of a safetensors file (its ``rows`` and ``columns``, slices of axes 0
    and 1 with step 1), read from its bytes with an ``ml_dtypes`` dtype."""
    if rows.step not in (None, 1) or columns.step not in (None, 1):
        raise ValueError(f"rows and columns must be slices with step 1, not {rows}, {columns}.")
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        info = header[key]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {info['dtype']}, which jnnsight cannot read.")
        shape = list(info["shape"])
        start = 8 + size + info["data_offsets"][0]
        if not shape:
            f.seek(start)
            return np.frombuffer(f.read(np.dtype(dtype).itemsize), dtype=dtype).reshape(())
        first, last, _ = rows.indices(shape[0])
        last = max(last, first)
        inner = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize  # bytes per row
        if len(shape) == 1 or columns.indices(shape[1])[:2] == (0, shape[1]):
            data = bytearray((last - first) * inner)
            f.seek(start + first * inner)
            f.readinto(data)
            return np.frombuffer(data, dtype=dtype).reshape([last - first, *shape[1:]])
        left, right, _ = columns.indices(shape[1])
        right = max(right, left)
        cell = inner // shape[1]  # bytes per column of one row
        width = (right - left) * cell
        data = bytearray((last - first) * width)
        view = memoryview(data)
        for i, row in enumerate(range(first, last)):
            f.seek(start + row * inner + left * cell)
            f.readinto(view[i * width:(i + 1) * width])
        return np.frombuffer(data, dtype=dtype).reshape([last - first, right - left, *shape[2:]])


def _float_dtype(dtype: Any) -> np.dtype | None:
    """``dtype`` as numpy's (``jnp.bfloat16``, ``"bfloat16"``, and torch's ``torch.bfloat16``,
    an nnsight habit), checked to be floating-point; None stays None."""
    if dtype is None:
        return None
    if type(dtype).__module__ == "torch":  # torch.bfloat16 -> "bfloat16", without torch
        dtype = str(dtype).removeprefix("torch.")
    try:
        target = np.dtype(dtype)
    except TypeError:
        raise CheckpointError(f"dtype must be a floating-point type (jnp.float32, jnp.bfloat16, "
                              f"...), not {dtype!r}.") from None
    if target.name not in _COMPUTE_DTYPES:
        raise CheckpointError(
            f"dtype must be a floating-point type a model computes in ({', '.join(_COMPUTE_DTYPES)}), "
            f"not {target}." + (" float8 types hold weights for scaled matrix products, "
                                "which these models do not do: their logits would be NaN."
                                if target.name.startswith("float8") else ""))
    return target


# the floating-point types a model computes in (float8 and float4 overflow without scales)
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _is_float(dtype: np.dtype) -> bool:
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.floating))


def _cast(array: np.ndarray, target: np.dtype | None) -> np.ndarray:
    if target is None or array.dtype == target or not _is_float(array.dtype):
        return array
    return array.astype(target)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _interactive() -> bool:
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    return "ipykernel" in sys.modules


def _progress_bar(total_bytes: int, desc: str, progress: bool | None) -> Any:
    show = progress if progress is not None else (total_bytes >= PROGRESS_MIN_BYTES and _interactive())
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def iter_progress(items: list, total_bytes: int, desc: str, progress: bool | None) -> Iterator:
    """``items``, with a bar counting their ``nbytes`` (for the GGUF loader)."""
    with _progress_bar(total_bytes, desc, progress) as bar:
        for item in items:
            yield item
            bar.update(int(getattr(item, "n_bytes", 0)))


# --------------------------------------------------------------------------- all together


def load_checkpoint(
    name_or_path: str | os.PathLike,
    dtype: Any = None,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    progress: bool | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, tensors)`` of a hub id, folder or ``.gguf`` file, tensors under Hugging Face keys.

    GGUF tensors are dequantized (float32 unless ``dtype`` says otherwise).
    """
    path = resolve(name_or_path, revision, gguf_file=gguf_file)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf_file import load_gguf

        return load_gguf(path, dtype=np.float32 if dtype is None else dtype, progress=progress)
    return load_config(path), load_safetensors(path, dtype, progress=progress)
