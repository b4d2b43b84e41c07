"""safetensors written one tensor (or one range of rows) at a time; edgephi/safetensors_io.py reads them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgephi.safetensors_io import DATA_ALIGN, DTYPES

DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items() if k != "BF16"}


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
