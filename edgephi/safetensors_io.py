"""safetensors read by memory-mapping (no copy, bf16 included) and written one tensor at a time.

The `safetensors` package reads into memory and has no bf16 in numpy; models of 14B parameters need
neither, so the container (8-byte header length, JSON header, raw little-endian data) is handled here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import EdgephiError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}
DATA_ALIGN = 64  # where tensor data starts in files we write, so mapped planes are cache-aligned
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file, mapped. `header[name]` = {"dtype", "shape", "data_offsets"}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise EdgephiError(f"{self.path}: truncated safetensors file (no header)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER or 8 + n > size:
                    raise EdgephiError(f"{self.path}: corrupt safetensors header (length {n})")
                raw = f.read(n)
        except OSError as exc:
            raise EdgephiError(f"{self.path}: cannot read ({exc.strerror})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise EdgephiError(f"{self.path}: corrupt safetensors header ({exc})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        for name, info in header.items():
            try:
                begin, end = info["data_offsets"]
                dtype, shape = info["dtype"], info["shape"]
            except (KeyError, TypeError, ValueError):
                raise EdgephiError(f"{self.path}: corrupt safetensors entry for {name!r}") from None
            if dtype not in DTYPES:
                raise EdgephiError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            want = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if end - begin != want or begin < 0:
                raise EdgephiError(f"{self.path}: tensor {name!r} size does not match its shape {shape}")
            if end > data_size:
                raise EdgephiError(f"{self.path}: truncated (tensor {name!r} runs past the end of the file)")
        self.header = header
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def raw(self, name: str) -> np.ndarray:
        """The stored array, mapped: bf16 comes back as its uint16 bit pattern."""
        info = self.header[name]
        begin, end = info["data_offsets"]
        data = self._map[self.data_start + begin:self.data_start + end]
        return data.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widening is exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


class SafetensorsWriter:
    """Writes a file whose tensor list is declared up front; data then arrives in row ranges,
    in any order, so a large tensor never has to be in memory whole.

    entries: [(name, numpy dtype or "BF16", shape)] in file order.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata or {})}
        offset = 0
        self._entries = {}
        for name, dtype, shape in entries:
            label = dtype if dtype == "BF16" else DTYPE_NAMES[np.dtype(dtype)]  # bf16 arrives as uint16 bits
            dtype = np.dtype(DTYPES[label])
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": label, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._entries[name] = [dtype, tuple(shape), offset, nbytes, 0]  # last: bytes written
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-(8 + len(text)) % DATA_ALIGN)
        self._data_start = 8 + len(text)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(self._fd, len(text).to_bytes(8, "little") + text, 0)
            os.ftruncate(self._fd, self._data_start + offset)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, name: str, array: np.ndarray, row_start: int = 0) -> None:
        """Rows [row_start, row_start + len(array)) of tensor `name`."""
        entry = self._entries[name]
        dtype, shape, offset, nbytes, _ = entry
        if array.dtype != dtype or tuple(array.shape[1:]) != shape[1:] or row_start + len(array) > shape[0]:
            raise ValueError(f"{name}: expected rows of {dtype} {shape}, got {array.dtype} {array.shape} "
                             f"at row {row_start}")
        row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
        data = np.ascontiguousarray(array).data.cast("B")
        os.pwrite(self._fd, data, self._data_start + offset + row_start * row_bytes)
        entry[4] += len(data)

    def close(self) -> None:
        try:
            incomplete = [n for n, e in self._entries.items() if e[4] != e[3]]
            if incomplete:
                raise ValueError(f"{self.path}: tensors not fully written: {', '.join(incomplete[:5])}")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        os.close(self._fd)
