"""safetensors read by memory-mapping (no copy, bf16 included); the converter writes them
(edgephi/convert/safetensors_writer.py).

The `safetensors` package reads into memory and has no bf16 in numpy; models of 14B parameters need
neither, so the container (8-byte header length, JSON header, raw little-endian data) is handled here.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np

from .errors import EdgephiError
from .files import brief, open_regular, parse_json

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
DATA_ALIGN = 64  # where tensor data starts in files we write, so mapped planes are cache-aligned
MAX_HEADER = 100 * 1024 * 1024
MAX_DIMS = 32  # numpy's limit; it also keeps the product of a hostile shape cheap to compute


class SafetensorsFile:
    """One .safetensors file, mapped. `header[name]` = {"dtype", "shape", "data_offsets"}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        fd = open_regular(self.path)  # a FIFO or a device is refused before it is read
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                raise EdgephiError(f"{self.path}: truncated safetensors file (no header)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise EdgephiError(f"{self.path}: corrupt safetensors header (length {n})")
            raw = os.pread(fd, n, 8)
            if len(raw) < n:
                raise EdgephiError(f"{self.path}: truncated safetensors file (header)")
            self.data_start = 8 + n
            header = parse_json(raw, f"{self.path}: corrupt safetensors header", dict)
            self.metadata = self._check_header(header, size - self.data_start)
            # mmap of a zero-length file fails; a header with no tensors needs no map
            self._map = np.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_READ), np.uint8) if header else None
        except OSError as exc:
            raise EdgephiError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        finally:
            os.close(fd)
        self.header = header

    def _check_header(self, header: dict, data_size: int) -> dict[str, str]:
        """Each entry typed and inside the data, no two tensors sharing a byte; pops and returns
        the `__metadata__` object."""
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise EdgephiError(f"{self.path}: corrupt safetensors header (__metadata__ must map names to strings)")
        spans = []
        for name, info in header.items():
            spans.append((*self._check_entry(name, info, data_size), name))
        end, previous = 0, None
        for begin, stop, name in sorted(spans):
            if begin < end:
                raise EdgephiError(f"{self.path}: tensors {brief(previous)} and {brief(name)} overlap")
            end, previous = stop, name
        return metadata

    def _check_entry(self, name: str, info, data_size: int) -> tuple[int, int]:
        def corrupt(problem: str):
            raise EdgephiError(f"{self.path}: corrupt safetensors entry for {brief(name)} ({problem})")

        if not isinstance(info, dict):
            corrupt("not a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            corrupt(f"dtype {brief(dtype)}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and d >= 0 for d in shape)):
            corrupt(f"shape {brief(shape)} is not a list of sizes")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            corrupt(f"data_offsets {brief(offsets)} are not two integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            corrupt(f"data_offsets {brief(offsets)}")
        if dtype not in DTYPES:
            raise EdgephiError(f"{self.path}: tensor {brief(name)} has unsupported dtype {dtype[:40]}")
        want = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize  # Python ints: cannot wrap
        if end - begin != want:
            raise EdgephiError(f"{self.path}: tensor {brief(name)} size does not match its shape {brief(shape)}")
        if end > data_size:
            raise EdgephiError(f"{self.path}: truncated (tensor {brief(name)} runs past the end of the file)")
        return begin, end

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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
