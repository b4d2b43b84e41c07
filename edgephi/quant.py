"""Weight formats with GGUF's block semantics, stored as separate planes for fast kernels.

A quantized matrix [N, K] (N output rows, K inputs) is cut into blocks of 32 along K, exactly as
ggml does, but instead of GGUF's interleaved 18/20/34-byte blocks each field is its own array:
  qs  uint8 [N, K/2] (4-bit) or int8 [N, K] (8-bit)   packed values, one row after another
  d   float16 [N, K/32]                               block scale
  m   float16 [N, K/32]                               block minimum (q4_1 only)
so a kernel streams qs with unit stride and reads the small scale planes beside it.
4-bit nibble order is ggml's: byte j of a block holds element j (low nibble) and j+16 (high).
The converter quantizes (edgephi/convert/quantize.py); the runtime's kernels and this module's
numpy dequantize read the planes.
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


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [..., 16] -> uint8 [..., 32]: a block's elements in order (ggml's nibble order above)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


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
        q = unpack_nibbles(qs.reshape(-1, BLOCK // 2)).astype(np.float32)
        if fmt.name == "q4_0":
            x = (q - np.float32(8)) * d
        else:
            x = q * d + planes["m"].reshape(-1, 1).astype(np.float32)
    return x.reshape(rows, -1)


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
