"""A GGUF (v2/v3, little-endian) reader: metadata as Python values, tensor locations and sizes."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgephi.errors import EdgephiError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# value type id -> struct code (8 = string, 9 = array are handled apart)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
ARRAY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# ggml type id -> (elements per block, bytes per block) for the types this reader can size
TYPE_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
              9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
              14: (256, 210), 15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),
              28: (1, 8), 30: (1, 2)}
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 30: "BF16"}


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
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise EdgephiError(f"{self.path}: cannot read ({exc})") from None
        self._buf = memoryview(self._map)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError):
            raise EdgephiError(f"{self.path}: truncated or corrupt GGUF header") from None

    def _read(self, code: str):
        value = struct.unpack_from("<" + code, self._buf, self._pos)[0]
        self._pos += struct.calcsize(code)
        return value

    def _string(self) -> str:
        n = self._read("Q")
        if self._pos + n > len(self._buf):
            raise IndexError
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype in SCALARS:
            return self._read(SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._read("I"), self._read("Q")
            if etype in ARRAY_DTYPES:
                dt = np.dtype(ARRAY_DTYPES[etype]).newbyteorder("<")
                end = self._pos + count * dt.itemsize
                if end > len(self._buf):
                    raise IndexError
                arr = np.frombuffer(self._buf[self._pos:end], dtype=dt)
                self._pos = end
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        raise EdgephiError(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != MAGIC:
            raise EdgephiError(f"{self.path}: not a GGUF file (bad magic)")
        self._pos = 4
        version = self._read("I")
        if version not in (2, 3):
            raise EdgephiError(f"{self.path}: unsupported GGUF version {version} (expected 2 or 3)")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise EdgephiError(f"{self.path}: corrupt GGUF header (counts {n_tensors}, {n_kv})")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            ndim = self._read("I")
            if ndim > 4:
                raise EdgephiError(f"{self.path}: corrupt GGUF tensor info for {name!r}")
            dims = [self._read("Q") for _ in range(ndim)]
            infos.append((name, dims, self._read("I"), self._read("Q")))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise EdgephiError(f"{self.path}: corrupt GGUF header (general.alignment {align!r})")
        data_start = self._pos + (-self._pos) % align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, gtype, offset in infos:
            if gtype not in TYPE_SIZES:
                raise EdgephiError(f"{self.path}: tensor {name!r} has unknown ggml type {gtype}")
            block, size = TYPE_SIZES[gtype]
            count = int(np.prod(dims, dtype=np.int64))
            if dims and dims[0] % block:
                raise EdgephiError(f"{self.path}: tensor {name!r} rows are not whole blocks")
            nbytes = count // block * size
            start = data_start + offset
            if start + nbytes > len(self._buf):
                raise EdgephiError(f"{self.path}: truncated (tensor {name!r} runs past the end of the file)")
            self.tensors[name] = GGUFTensor(name, gtype, tuple(reversed(dims)), start, nbytes)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def float_array(self, name: str) -> np.ndarray:
        """An F32 or F16 tensor, as float32 in its numpy shape (a copy)."""
        t = self.tensors[name]
        dt = {0: "<f4", 1: "<f2"}.get(t.ggml_type)
        if dt is None:
            raise EdgephiError(f"{self.path}: tensor {name!r} is {t.type_name}, expected a float type")
        return self._map[t.offset:t.offset + t.nbytes].view(dt).astype(np.float32).reshape(t.shape)
