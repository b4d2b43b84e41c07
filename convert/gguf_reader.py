"""A GGUF (v2/v3, little-endian) reader: metadata as Python values, tensor locations and sizes."""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgephi.errors import EdgephiError
from edgephi.files import brief, open_regular

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16
MAX_ARRAY_DEPTH = 4  # GGUF allows arrays of arrays; no model file nests deeper than 2
# value type id -> struct code (8 = string, 9 = array are handled apart)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
ARRAY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# the fewest bytes one array element of a string (8: its length) or array (9: type and count) takes
MIN_ELEMENT_BYTES = {8: 8, 9: 12}
# ggml type id -> (name, elements per block, bytes per block): every type ggml defines, so that a
# file is sized and a type edgephi cannot compute with is refused by name
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
TYPE_SIZES = {t: (block, size) for t, (_, block, size) in GGML_TYPES.items()}
TYPE_NAMES = {t: name for t, (name, _, _) in GGML_TYPES.items()}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: rows first (GGUF stores ne[0], the row length, first)
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.ggml_type, f"type {self.ggml_type}")


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        fd = open_regular(self.path)  # a FIFO or a device is refused before it is read or mapped
        try:
            size = os.fstat(fd).st_size
            if size < 24:  # magic, version and the two counts
                raise EdgephiError(f"{self.path}: truncated or corrupt GGUF header ({size} bytes)")
            self._map = np.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_READ), dtype=np.uint8)
        except OSError as exc:
            raise EdgephiError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        finally:
            os.close(fd)
        self._buf = memoryview(self._map)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError):
            raise EdgephiError(f"{self.path}: truncated or corrupt GGUF header") from None

    def _corrupt(self, what: str):
        raise EdgephiError(f"{self.path}: corrupt GGUF header ({what})")

    def _read(self, code: str):
        value = struct.unpack_from("<" + code, self._buf, self._pos)[0]
        self._pos += struct.calcsize(code)
        return value

    def _take(self, n: int) -> memoryview:
        """The next n bytes; a length past the end of the file means truncation or corruption."""
        if n > len(self._buf) - self._pos:
            raise IndexError
        self._pos += n
        return self._buf[self._pos - n:self._pos]

    def _string(self) -> str:
        return bytes(self._take(self._read("Q"))).decode("utf-8")

    def _value(self, vtype: int, depth: int = 0):
        if vtype in SCALARS:
            return self._read(SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype != 9:
            self._corrupt(f"unknown value type {vtype}")
        etype, count = self._read("I"), self._read("Q")
        if etype in ARRAY_DTYPES:
            dt = np.dtype(ARRAY_DTYPES[etype]).newbyteorder("<")
            return np.frombuffer(self._take(count * dt.itemsize), dtype=dt).tolist()
        if etype not in MIN_ELEMENT_BYTES:
            self._corrupt(f"unknown value type {etype}")
        if depth >= MAX_ARRAY_DEPTH:
            self._corrupt(f"arrays nested more than {MAX_ARRAY_DEPTH} deep")
        # a count the rest of the file cannot hold is refused before looping over it
        if count * MIN_ELEMENT_BYTES[etype] > len(self._buf) - self._pos:
            raise IndexError
        return [self._value(etype, depth + 1) for _ in range(count)]

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != MAGIC:
            raise EdgephiError(f"{self.path}: not a GGUF file (bad magic)")
        self._pos = 4
        version = self._read("I")
        if version not in (2, 3):
            raise EdgephiError(f"{self.path}: unsupported GGUF version {version} (expected 2 or 3)")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        # each key-value takes at least 13 bytes and each tensor info 24
        if n_tensors * 24 + n_kv * 13 > len(self._buf):
            self._corrupt(f"counts {n_tensors} tensors, {n_kv} keys do not fit in the file")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.metadata:
                self._corrupt(f"key {brief(key)} appears twice")
            self.metadata[key] = self._value(self._read("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            ndim = self._read("I")
            if not 1 <= ndim <= 4:
                raise EdgephiError(f"{self.path}: corrupt GGUF tensor info for {brief(name)} ({ndim} dimensions)")
            dims = [self._read("Q") for _ in range(ndim)]
            infos.append((name, dims, self._read("I"), self._read("Q")))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(align, int) or isinstance(align, bool) or not 0 < align <= MAX_ALIGNMENT
                or align & (align - 1)):
            self._corrupt(f"general.alignment {align!r}"[:200])
        data_start = self._pos + (-self._pos) % align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, gtype, offset in infos:
            self.tensors[name] = self._tensor(name, dims, gtype, offset, data_start, align)
        self._check_disjoint()

    def _tensor(self, name: str, dims: list[int], gtype: int, offset: int, data_start: int,
                align: int) -> GGUFTensor:
        if name in self.tensors:
            raise EdgephiError(f"{self.path}: tensor {brief(name)} appears twice")
        if gtype not in TYPE_SIZES:
            raise EdgephiError(f"{self.path}: tensor {brief(name)} has unknown ggml type {gtype}")
        if 0 in dims:
            raise EdgephiError(f"{self.path}: tensor {brief(name)} has a dimension of size 0 {dims}")
        block, size = TYPE_SIZES[gtype]
        if dims[0] % block:
            raise EdgephiError(f"{self.path}: tensor {brief(name)} is {TYPE_NAMES[gtype]}, whose rows are blocks "
                               f"of {block} values, but its rows have {dims[0]}")
        if offset % align:
            raise EdgephiError(f"{self.path}: tensor {brief(name)} data offset {offset} is not {align}-byte aligned")
        nbytes = math.prod(dims) // block * size  # Python ints: a product of four uint64 cannot wrap
        start = data_start + offset
        if start + nbytes > len(self._buf):
            raise EdgephiError(f"{self.path}: truncated (tensor {brief(name)} runs past the end of the file: "
                               f"{nbytes} bytes at offset {start}, the file has {len(self._buf)})")
        return GGUFTensor(name, gtype, tuple(reversed(dims)), start, nbytes)

    def _check_disjoint(self) -> None:
        """Two tensors sharing bytes would make one silently read the other's data."""
        end, previous = 0, None
        for t in sorted(self.tensors.values(), key=lambda t: (t.offset, t.nbytes)):
            if t.offset < end:
                raise EdgephiError(f"{self.path}: tensors {brief(previous)} and {brief(t.name)} overlap")
            end, previous = t.offset + t.nbytes, t.name

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def float_array(self, name: str) -> np.ndarray:
        """An F32 or F16 tensor, as float32 in its numpy shape (a copy)."""
        t = self.tensors[name]
        dt = {0: "<f4", 1: "<f2"}.get(t.ggml_type)
        if dt is None:
            raise EdgephiError(f"{self.path}: tensor {brief(name)} is {t.type_name}, expected a float type")
        return self._map[t.offset:t.offset + t.nbytes].view(dt).astype(np.float32).reshape(t.shape)
