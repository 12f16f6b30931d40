"""Where things sit in a GGUF file: its key/value metadata and tensor table, read in one pass over the header.

    header   "GGUF", version u32, tensors u64, keys u64
    key      name (u64 length + UTF-8), value type u32, value
    value    a scalar, a string (u64 length + bytes), or an array: item type u32, count u64, items
    tensor   name, dims u32, each dim u64 (fastest first), ggml type u32, offset u64 from the data start
    data     after the tensor table, padded to general.alignment (32 by default)

`gguf.GGUFReader` builds a numpy view of every part of every value, so a vocabulary of 262k tokens takes it
about 20 s; here an array of numbers is one (offset, count) and an array of strings a walk over its lengths,
well under a second. Values are decoded where they are small (scalars, strings); arrays stay where they are,
to be read or written in place with `array()`. That this reads what `gguf.GGUFReader` reads is
tests/test_export_gguf_layout.py.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# GGUF value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALARS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
NUMPY = {UINT8: np.uint8, INT8: np.int8, UINT16: np.uint16, INT16: np.int16, UINT32: np.uint32, INT32: np.int32,
         FLOAT32: np.float32, BOOL: np.bool_, UINT64: np.uint64, INT64: np.int64, FLOAT64: np.float64}
DEFAULT_ALIGNMENT = 32


class GGUFLayoutError(ValueError):
    """Not a GGUF file this reader understands (one line)."""


@dataclass(frozen=True)
class ArrayRef:
    """An array value: its item type, item count, and the file offset of its first item."""

    item_type: int
    count: int
    offset: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # fastest-varying dimension first, as the file stores it
    ggml_type: int  # gguf.GGMLQuantizationType value
    offset: int  # of its data, from the start of the file


@dataclass
class GGUFLayout:
    path: Path
    version: int
    fields: dict  # key -> int / float / bool / str, or ArrayRef
    tensors: list[TensorInfo]

    def array(self, key: str, mode: str = "r") -> np.ndarray:
        """A numeric array value as a numpy memmap of the file ("r+": written in place)."""
        ref = self.fields.get(key)
        if not isinstance(ref, ArrayRef) or ref.item_type not in NUMPY:
            raise GGUFLayoutError(f"{self.path}: {key} is not an array of numbers")
        return np.memmap(self.path, dtype=np.dtype(NUMPY[ref.item_type]).newbyteorder("<"), mode=mode,
                         offset=ref.offset, shape=(ref.count,))


class _Cursor:
    def __init__(self, buf):
        self.buf, self.at = buf, 0

    def unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.at += n
        return bytes(self.buf[self.at - n:self.at]).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        unpack, buf = struct.Struct("<Q").unpack_from, self.buf
        at = self.at
        for _ in range(count):
            at += 8 + unpack(buf, at)[0]
        self.at = at

    def value(self, kind: int):
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise GGUFLayoutError(f"unknown GGUF value type {kind} at byte {self.at}")
        item_type, count = self.unpack("<I"), self.unpack("<Q")
        ref = ArrayRef(item_type, count, self.at)
        if item_type in SCALARS:
            self.at += struct.calcsize(SCALARS[item_type]) * count
        elif item_type == STRING:
            self.skip_strings(count)
        else:  # arrays of arrays: walk them
            for _ in range(count):
                self.value(item_type)
        return ref


def read_layout(path) -> GGUFLayout:
    """The metadata and tensor table of the GGUF file at `path` (version 2 or 3)."""
    path = Path(path)
    if path.stat().st_size < 24:  # magic, version and the two counts; mmap refuses an empty file
        raise GGUFLayoutError(f"{path}: not a GGUF file (shorter than a GGUF header)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(memoryview(buf))
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise GGUFLayoutError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
            c.at = 4
            version = c.unpack("<I")
            if version not in (2, 3):
                raise GGUFLayoutError(f"{path}: GGUF version {version}; this reader takes versions 2 and 3")
            n_tensors, n_keys = c.unpack("<Q"), c.unpack("<Q")
            fields = {}
            for _ in range(n_keys):
                key = c.string()
                fields[key] = c.value(c.unpack("<I"))
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                dims = tuple(c.unpack("<Q") for _ in range(c.unpack("<I")))
                infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
            start = c.at
            alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
            start += -start % alignment
        except struct.error:
            raise GGUFLayoutError(f"{path}: the GGUF header ends early (a cut or partly written file)") from None
        finally:
            c.buf.release()
    return GGUFLayout(path, version, fields, [TensorInfo(n, d, t, start + o) for n, d, t, o in infos])


def tensor_data(layout: GGUFLayout, tensor: TensorInfo) -> np.ndarray:
    """A tensor's data as `gguf.GGUFReader` gives it (and `gguf.quants.dequantize` takes it): numbers in the
    tensor's own dtype, or quantized blocks as bytes, shaped slowest dimension first; a memmap of the file."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    kind = gguf.GGMLQuantizationType(tensor.ggml_type)
    shape = tuple(reversed(tensor.shape))
    plain = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
             "I32": np.int32, "I64": np.int64}.get(kind.name)
    if plain is None:
        shape = quant_shape_to_byte_shape(shape, kind)
    dtype = np.dtype(plain or np.uint8)
    return np.memmap(layout.path, dtype=dtype, mode="r", offset=tensor.offset, shape=shape)
