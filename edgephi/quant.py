"""Weight formats with GGUF's block semantics, stored as separate planes for fast kernels.

A quantized matrix [N, K] (N output rows, K inputs) is cut into blocks of 32 along K, exactly as
ggml does, but instead of GGUF's interleaved 18/20/34-byte blocks each field is its own array:
  qs  uint8 [N, K/2] (4-bit) or int8 [N, K] (8-bit)   packed values, one row after another
  d   float16 [N, K/32]                               block scale
  m   float16 [N, K/32]                               block minimum (q4_1 only)
so a kernel streams qs with unit stride and reads the small scale planes beside it.
4-bit nibble order is ggml's: byte j of a block holds element j (low nibble) and j+16 (high).
Quantization is round-to-nearest with the same float32 arithmetic as the `gguf` package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelFormatError

BLOCK = 32


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int
    ggml_type: int  # GGUF's tensor type id
    gguf_block_bytes: int  # bytes per block of 32 in a GGUF file (0 for float formats)
    planes: tuple[tuple[str, str, int], ...]  # (plane, numpy dtype, columns per block of 32)

    @property
    def is_float(self) -> bool:
        return self.gguf_block_bytes == 0


FORMATS = {
    f.name: f
    for f in (
        QuantFormat("f32", 32, 0, 0, (("", "float32", 32),)),
        QuantFormat("f16", 16, 1, 0, (("", "float16", 32),)),
        QuantFormat("q4_0", 4, 2, 18, (("qs", "uint8", 16), ("d", "float16", 1))),
        QuantFormat("q4_1", 4, 3, 20, (("qs", "uint8", 16), ("d", "float16", 1), ("m", "float16", 1))),
        QuantFormat("q8_0", 8, 8, 34, (("qs", "int8", 32), ("d", "float16", 1))),
    )
}
FORMAT_BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}


def plane_key(name: str, plane: str) -> str:
    return f"{name}.{plane}" if plane else name


def plane_layout(fmt: QuantFormat, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """plane -> (dtype, shape) of a tensor of logical `shape` stored in `fmt`."""
    if fmt.is_float:
        return {"": (fmt.planes[0][1], tuple(shape))}
    rows, cols = shape
    return {p: (dt, (rows, cols // BLOCK * per_block)) for p, dt, per_block in fmt.planes}


def can_quantize(fmt: QuantFormat, shape: tuple[int, ...]) -> bool:
    return fmt.is_float or (len(shape) == 2 and shape[1] % BLOCK == 0)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q uint8 [n, 32] in 0..15 -> uint8 [n, 16], element j low, element j+16 high."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> uint8 [n, 32]."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf, which ggml's q8_0 reference uses (numpy's round is half-to-even)."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + np.floor(2 * (a - whole)))


def _reciprocal_or_zero(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def quantize(x: np.ndarray, fmt: QuantFormat) -> dict[str, np.ndarray]:
    """x float [N, K] -> planes of `fmt`."""
    if fmt.is_float:
        return {"": np.ascontiguousarray(x, dtype=fmt.planes[0][1])}
    rows, cols = x.shape
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, BLOCK)  # [N*K/32, 32]
    if fmt.name == "q8_0":
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        q = _round_half_away(blocks * _reciprocal_or_zero(d)).astype(np.int8)
        planes = {"qs": q, "d": d.astype(np.float16)}
    elif fmt.name == "q4_0":
        # d is the value of largest magnitude, sign kept, over -8: that value maps to q = 0.
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
        d = extreme / np.float32(-8)
        q = np.trunc(blocks * _reciprocal_or_zero(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
        planes = {"qs": _pack_nibbles(q), "d": d.astype(np.float16)}
    elif fmt.name == "q4_1":
        lo = blocks.min(axis=1, keepdims=True)
        d = (blocks.max(axis=1, keepdims=True) - lo) / np.float32(15)
        q = np.trunc((blocks - lo) * _reciprocal_or_zero(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
        planes = {"qs": _pack_nibbles(q), "d": d.astype(np.float16), "m": lo.astype(np.float16)}
    else:
        raise ValueError(f"unknown quant format {fmt.name!r}")
    return {p: a.reshape(rows, -1) for p, a in planes.items()}


def dequantize(planes: dict[str, np.ndarray], fmt: QuantFormat) -> np.ndarray:
    """planes of `fmt` -> float32 [N, K] (or the float tensor's own shape)."""
    if fmt.is_float:
        return np.asarray(planes[""], dtype=np.float32)
    qs = planes["qs"]
    rows = qs.shape[0]
    d = planes["d"].reshape(-1, 1).astype(np.float32)
    if fmt.name == "q8_0":
        x = qs.reshape(-1, BLOCK).astype(np.float32) * d
    else:
        q = _unpack_nibbles(qs.reshape(-1, BLOCK // 2)).astype(np.float32)
        if fmt.name == "q4_0":
            x = (q - np.float32(8)) * d
        else:
            x = q * d + planes["m"].reshape(-1, 1).astype(np.float32)
    return x.reshape(rows, -1)


def planes_from_gguf_blocks(raw: np.ndarray, fmt: QuantFormat, rows: int) -> dict[str, np.ndarray]:
    """GGUF block bytes (uint8, rows x K/32 blocks) -> planes, bit for bit."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, fmt.gguf_block_bytes)
    out, at = {}, 0
    for order in ("d", "m", "qs"):  # ggml's field order inside a block
        for plane, dt, per_block in fmt.planes:
            if plane == order:
                width = np.dtype(dt).itemsize * per_block
                out[plane] = np.ascontiguousarray(blocks[:, at:at + width]).view(dt).reshape(rows, -1)
                at += width
    return {plane: out[plane] for plane, _, _ in fmt.planes}


def planes_to_gguf_blocks(planes: dict[str, np.ndarray], fmt: QuantFormat) -> np.ndarray:
    """planes -> GGUF block bytes uint8 [N, K/32 * block bytes] (for export and tests)."""
    rows = planes["qs"].shape[0]
    fields = [planes[p] for p in ("d", "m", "qs") if p in planes]
    nblocks = planes["d"].size
    parts = [np.ascontiguousarray(f).reshape(nblocks, -1).view(np.uint8) for f in fields]
    return np.concatenate(parts, axis=1).reshape(rows, -1)


FINITE_CHECK_ELEMENTS = 1 << 20  # elements per step: the check's scratch stays a few MB


def first_nonfinite(arr: np.ndarray) -> int | None:
    """Index (flat) of the first NaN or Inf in a float32 array or in float16 bits (uint16), or None."""
    flat = arr.reshape(-1)
    for start in range(0, flat.size, FINITE_CHECK_ELEMENTS):
        chunk = flat[start:start + FINITE_CHECK_ELEMENTS]
        if chunk.dtype == np.uint16:  # float16 bits: an all-ones exponent is Inf or NaN
            if (chunk & np.uint16(0x7FFF)).max() < 0x7C00:  # one pass: twice as fast as a mask and any()
                continue
            bad = (chunk & np.uint16(0x7FFF)) >= np.uint16(0x7C00)
        else:
            bad = ~np.isfinite(chunk)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def check_finite(where, name: str, planes: dict[str, np.ndarray]) -> None:
    """Scales, minimums and float weights must be finite: one NaN silently turns every reply into
    the first token id. Quantized values themselves are integers and cannot be."""
    for plane, arr in planes.items():
        if plane == "qs":
            continue
        at = first_nonfinite(arr.view(np.uint16) if arr.dtype == np.float16 else arr)
        if at is not None:
            what = {"d": "block scale", "m": "block minimum", "": "value"}[plane]
            raise ModelFormatError(f"{where}: tensor {name!r} has a non-finite {what} (NaN or Inf) at element {at}")
