"""The GGUF container: metadata and a tensor table, read in one pass; tensor data stays on disk.

``gguf.GGUFReader`` builds a numpy view for every item of every metadata array;
a llama.cpp file carries its tokenizer's 50,000-150,000 tokens and merges as
such arrays, which takes it 5-6 s per open on a 2-core machine. This reader
walks the same layout with ``struct`` and decodes strings straight from a
memory map (0.1 s), and keeps the ``gguf`` package for what needs it: the
type tables and dequantization. Its values are what ``ReaderField.contents()``
gives (``str``, ``int``, ``float``, ``bool``, lists), and its tensors have the
shape, type and data view of ``ReaderTensor``; tests/test_loading.py checks
both against ``gguf.GGUFReader``.

Layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
``b"GGUF"``, ``uint32`` version (2 or 3), ``uint64`` tensor count, ``uint64``
key-value count; the key-values (a string key, a ``uint32`` value type, the
value; a string is a ``uint64`` length and UTF-8 bytes; an array is a
``uint32`` item type, a ``uint64`` count and the items); the tensor infos (a
string name, a ``uint32`` dimension count, ``uint64`` dimensions fastest
first, a ``uint32`` GGML type, a ``uint64`` offset); then, aligned to
``general.alignment`` (32 unless set), the tensor data.

Example::

    >>> file = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> file.fields["general.architecture"], len(file.fields["tokenizer.ggml.tokens"])
    ('llama', 49152)
    >>> file.tensors[0].name, file.tensors[0].shape           # GGML order: fastest axis first
    ('token_embd.weight', (576, 49152))
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value types (gguf.GGUFValueType) with their struct formats; 8 is a
# string and 9 an array, read apart.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# GGML tensor types stored as plain numbers, not blocks: their numpy item type.
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64,
          "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF file this reader understands (cut short, foreign, or another version)."""


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the file: ``shape`` in GGML order (fastest axis first), ``data`` a
    read-only view of the file in numpy order (bytes per row for block-quantized types),
    as ``gguf.ReaderTensor`` has them."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    n_elements: int
    data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata (``fields``, key to value) and tensors, in file order."""

    path: Path
    version: int
    fields: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    """Reads GGUF's little-endian values from a buffer, advancing an offset."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.offset = buffer, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("Q")
        end = self.offset + size
        if end > len(self.buffer):
            raise GGUFFormatError(f"a string of {size} bytes runs past the end of the file")
        text = str(self.buffer[self.offset:end], "utf-8")
        self.offset = end
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("I"), self.scalar("Q")
            if item in _SCALARS:  # numbers in one block: numpy reads them at once
                fmt = "<" + _SCALARS[item]
                size = struct.calcsize(fmt) * count
                if self.offset + size > len(self.buffer):
                    raise GGUFFormatError(f"an array of {count} items runs past the end of the file")
                items = np.frombuffer(self.buffer, np.dtype(fmt), count, self.offset).tolist()
                self.offset += size
                return items
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise GGUFFormatError(f"unknown value type {kind} at byte {self.offset - 4}")
        return self.scalar(_SCALARS[kind])


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """The metadata and tensor table of the GGUF file at ``path``; tensor data is
    a read-only memory map. Raises :class:`GGUFFormatError` on anything else,
    ``OSError`` where the file cannot be opened."""
    import gguf

    path = Path(path)
    mapped = np.memmap(path, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    cursor = _Cursor(memoryview(mapped))
    try:
        if bytes(cursor.buffer[:4]) != MAGIC:
            raise GGUFFormatError("it does not start with b'GGUF'")
        cursor.offset = 4
        version = cursor.scalar("I")
        if version & 0xFFFF == 0:
            raise GGUFFormatError("it is a big-endian GGUF file; convert it to little-endian "
                                  "with llama.cpp's gguf_convert_endian.py")
        if version not in VERSIONS:
            raise GGUFFormatError(f"it is GGUF version {version}; this reader reads versions "
                                  f"{' and '.join(map(str, VERSIONS))}")
        n_tensors, n_fields = cursor.scalar("Q"), cursor.scalar("Q")
        fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = cursor.string()
            if key in fields:
                raise GGUFFormatError(f"it has the key {key!r} twice")
            fields[key] = cursor.value(cursor.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            shape = tuple(cursor.scalar("Q") for _ in range(cursor.scalar("I")))
            infos.append((name, shape, cursor.scalar("I"), cursor.scalar("Q")))
    except struct.error as err:
        raise GGUFFormatError(f"it ends inside its header ({err})") from err
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"its general.alignment {alignment!r} is not a power of two")
    start = -(-cursor.offset // alignment) * alignment
    tensors, names = [], set()
    for name, shape, raw_type, offset in infos:
        if name in names:
            raise GGUFFormatError(f"it has the tensor {name!r} twice")
        names.add(name)
        try:
            kind = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has GGML type {raw_type}, which the installed "
                                  "gguf package does not know; upgrade it") from None
        n_elements = int(np.prod(shape, dtype=np.int64))
        block, size = gguf.GGML_QUANT_SIZES[kind]
        n_bytes = n_elements * size // block
        begin = start + offset
        if begin + n_bytes > len(mapped):
            raise GGUFFormatError(f"tensor {name!r} runs past the end of the file")
        numpy_shape = tuple(reversed(shape))
        item = _PLAIN.get(kind.name)
        try:
            if item is None:
                numpy_shape = gguf.quants.quant_shape_to_byte_shape(numpy_shape, kind)
                data = mapped[begin:begin + n_bytes].reshape(numpy_shape)
            else:
                data = mapped[begin:begin + n_bytes].view(item).reshape(numpy_shape)
        except ValueError as err:  # rows that are not whole blocks
            raise GGUFFormatError(f"tensor {name!r} of shape {shape} does not fit type {kind.name}: {err}") from None
        tensors.append(GGUFTensor(name, shape, kind, n_elements, data))
    return GGUFFile(path, version, fields, tensors)
