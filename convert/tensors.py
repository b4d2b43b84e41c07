"""A source tensor: rows read lazily from mapped files, possibly stacked from several source
tensors (Llama's q/k/v -> qkv) and reordered (undoing llama.cpp's Q/K row permutation)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgephi.format import source_parts
from edgephi.quant import QuantFormat, dequantize


@dataclass
class Part:
    rows: int
    cols: int
    read_floats: Callable[[np.ndarray], np.ndarray]  # source row indices -> float32 [n, cols]
    fmt: QuantFormat | None = None  # the format the source holds these rows in, when it is one of ours
    read_planes: Callable[[np.ndarray], dict] | None = None  # source row indices -> planes
    order: np.ndarray | None = None  # order[i] = source row of output row i


@dataclass
class SourceTensor:
    name: str  # edgephi tensor name
    origin: str  # source tensor name(s), for messages
    parts: list[Part]

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(p.rows for p in self.parts), self.parts[0].cols)

    @property
    def stored_format(self) -> QuantFormat | None:
        """The format every part is stored in, if they share one."""
        fmts = {p.fmt.name if p.fmt else None for p in self.parts}
        return self.parts[0].fmt if len(fmts) == 1 else None

    def _pieces(self, start: int, stop: int):
        """(part, source row indices) covering output rows [start, stop)."""
        base = 0
        for part in self.parts:
            lo, hi = max(start, base), min(stop, base + part.rows)
            if lo < hi:
                idx = np.arange(lo - base, hi - base)
                yield part, (part.order[idx] if part.order is not None else idx)
            base += part.rows

    def floats(self, start: int, stop: int) -> np.ndarray:
        """float32 [stop-start, cols]; quantized sources are dequantized."""
        return np.concatenate([p.read_floats(idx) if p.read_planes is None else
                               dequantize(p.read_planes(idx), p.fmt) for p, idx in self._pieces(start, stop)])

    def planes(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The stored planes of rows [start, stop), bit for bit (only when stored_format is set)."""
        pieces = [p.read_planes(idx) for p, idx in self._pieces(start, stop)]
        return {k: np.concatenate([piece[k] for piece in pieces]) for k in pieces[0]}


class Source:
    """What the HF and GGUF sources share: tensors assembled from parts that `_part` makes, named
    by edgephi.format's tensor table in the column `NAMING` ("hf" or "gguf")."""

    NAMING = ""

    def _part(self, name: str, shape: tuple[int, ...], order=None) -> Part:
        raise NotImplementedError

    def tensors(self):
        """Yields SourceTensors in file order: embed, each layer's tensors, norm, output."""
        for name in self.config.iter_tensor_names():
            parts = source_parts(self.config, name)
            origins = [hf if self.NAMING == "hf" else gguf for hf, gguf, _ in parts]
            if len(parts[0][2]) == 1:
                yield self._vector(name, origins[0])
            else:
                yield self._matrix(name, origins, [shape for _, _, shape in parts])

    def _matrix(self, name: str, origins: list[str], shapes, orders=None) -> SourceTensor:
        orders = orders or [None] * len(origins)
        return SourceTensor(name, " + ".join(origins),
                            [self._part(o, s, order) for o, s, order in zip(origins, shapes, orders)])

    def _vector(self, name: str, origin: str) -> SourceTensor:
        """A 1-D tensor (a norm weight), read once and stored as one row."""
        arr = self._part(origin, (self.config.hidden_size,)).read_floats(np.arange(1))
        return SourceTensor(name, origin, [Part(1, arr.shape[-1], lambda idx: arr[idx])])


class RowReader:
    """Reads rows of a tensor stored at `offset` in a file with pread: unlike a memory map, pages
    read once do not stay in the converter's resident memory, so a 14B checkpoint converts in
    a few hundred MB."""

    def __init__(self, path, offset: int, row_bytes: int):
        self.path, self.offset, self.row_bytes = path, offset, row_bytes

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        """uint8 [len(idx), row_bytes] for the given row indices."""
        lo, hi = int(idx.min()), int(idx.max()) + 1
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, (hi - lo) * self.row_bytes, self.offset + lo * self.row_bytes)
        finally:
            os.close(fd)
        if len(data) != (hi - lo) * self.row_bytes:
            raise OSError(f"{self.path}: file shrank while converting")
        block = np.frombuffer(data, dtype=np.uint8).reshape(hi - lo, self.row_bytes)
        return block if (hi - lo == len(idx) and idx[0] == lo and np.all(np.diff(idx) == 1)) else block[idx - lo]
