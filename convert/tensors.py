"""A source tensor: rows read lazily from mapped files, possibly stacked from several source
tensors (Llama's q/k/v -> qkv) and reordered (undoing llama.cpp's Q/K row permutation)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgephi.format import source_parts
from edgephi.quant import FORMATS, QuantFormat, block_values, dequantize

# formats whose values another holds exactly, with the same scales: (members, the wider one)
WIDENINGS = {("q4_0", "q5_0", "q8_0"): "q8_0", ("q4_1", "q5_1"): "q5_1", ("q4_k", "q5_k"): "q5_k"}


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
        """The format every part is stored in, if they share one, or one that holds each part's
        values exactly (q/k/v of a GGUF mix stacked into one matrix); None for float sources."""
        names = {p.fmt.name if p.fmt else None for p in self.parts}
        if None in names:
            return None
        if len(names) == 1:
            return self.parts[0].fmt
        for members, wide in WIDENINGS.items():
            if names <= set(members):
                return FORMATS[wide]
        return FORMATS["f32"]  # different block families: float32 holds every value exactly

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
        """The stored planes of rows [start, stop) in stored_format, bit for bit (only when it is set
        and quantized)."""
        target = self.stored_format
        pieces = [widen(p.read_planes(idx), p.fmt, target) for p, idx in self._pieces(start, stop)]
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


def widen(planes: dict[str, np.ndarray], fmt: QuantFormat, target: QuantFormat) -> dict[str, np.ndarray]:
    """planes of `fmt` as planes of `target` (a WIDENINGS pair), the same values exactly."""
    if fmt.name == target.name:
        return planes
    rows = planes["qs"].shape[0]
    if target.name == "q8_0":  # q - 8 or q - 16 as int8, the same block scale
        offset = 8 if fmt.name == "q4_0" else 16
        values = block_values(planes, fmt).astype(np.int16) - offset
        return {"qs": values.astype(np.int8).reshape(rows, -1), "d": planes["d"]}
    # q4_1 -> q5_1, q4_k -> q5_k: the same nibbles with a zero fifth bit
    wide = dict(planes, qh=np.zeros((rows, planes["qs"].shape[1] // 4), np.uint8))
    return {plane: wide[plane] for plane, _, _ in target.planes}
