"""A GGUF file's metadata and tensor index, read directly (format v2/v3).

`gguf.GGUFReader` builds a numpy view for every part of every metadata value: for the
bundled model's 49k-token vocabulary and 49k merges that takes ~5 s, paid by every
train, evaluate and export process. This reads the same metadata with `struct` in a few
tens of milliseconds; tensor data stays a memory map (nothing is copied until a tensor
is dequantized, which `gguf.quants.dequantize` still does). tests/test_bundled.py checks
it against GGUFReader.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

MAGIC = b"GGUF"
# numeric value types -> numpy dtype (8 = string, 9 = array)
_NUMERIC = {k: np.dtype(v) for k, v in {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
                                         7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}.items()}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists dimensions innermost first)
    ggml_type: int
    data: np.ndarray  # memory-mapped: elements for float/int types, raw bytes per row for quantized ones


class GGUFFormatError(ValueError):
    pass


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFFormatError(f"{self.path}: truncated GGUF header at byte {self.pos}")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"{self.path}: truncated GGUF string at byte {self.pos}")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def numbers(self, dtype: np.dtype, n: int) -> list:
        if self.pos + n * dtype.itemsize > len(self.buf):
            raise GGUFFormatError(f"{self.path}: truncated GGUF value at byte {self.pos}")
        out = np.frombuffer(self.buf, dtype, count=n, offset=self.pos).tolist()
        self.pos += n * dtype.itemsize
        return out

    def value(self, vtype: int):
        if vtype in _NUMERIC:
            return self.numbers(_NUMERIC[vtype], 1)[0]
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item, n = self.take("<I"), self.take("<Q")
            if item in _NUMERIC:  # numeric arrays in one read
                return self.numbers(_NUMERIC[item], n)
            return [self.value(item) for _ in range(n)]
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def read(path: str, *, tensors: bool = True) -> tuple[dict, list[TensorEntry]]:
    """(metadata {key: python value}, tensor entries) of the GGUF file at `path`."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # the quant block sizes

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != MAGIC:
        raise GGUFFormatError(f"{path}: not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    fields = {}
    for _ in range(n_kv):
        key = cur.string()
        fields[key] = cur.value(cur.take("<I"))
    if not tensors:
        return fields, []
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
        infos.append((name, tuple(reversed(dims)), cur.take("<I"), cur.take("<Q")))
    align = int(fields.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    entries = []
    plain = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}
    for name, shape, ggml_type, offset in infos:
        n = int(np.prod(shape))
        if ggml_type in plain:
            data = np.frombuffer(buf, plain[ggml_type], count=n, offset=start + offset).reshape(shape)
        else:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            row_bytes = shape[-1] // block * size
            data = np.frombuffer(buf, np.uint8, count=n // shape[-1] * row_bytes,
                                 offset=start + offset).reshape(*shape[:-1], row_bytes)
        entries.append(TensorEntry(name, shape, ggml_type, data))
    return fields, entries
