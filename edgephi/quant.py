"""Weight formats with GGUF's block semantics, stored as separate planes for fast kernels.

A quantized matrix [N, K] (N output rows, K inputs) is cut into blocks of 32 along K, exactly as
ggml does, but instead of GGUF's interleaved blocks each field is its own array, one row after
another, so a kernel streams qs with unit stride and reads the small planes beside it:
  qs  uint8 [N, K/2]: the low 4 bits of each value; in every block of 32, byte j holds value j
      (low nibble) and value j + 16 (high nibble), ggml's q4_0 order. q8_0: int8 [N, K] values.
  qh  uint8 [N, K/8] (5-bit formats): a little-endian uint32 per block, bit j = bit 4 of value j.
      q6_k: two such words per block [N, K/4], bit 4 then bit 5.
  d   float16: the scale of each block of 32 [N, K/32], or of each super-block of 256 (K-quants).
  m   float16: q4_1/q5_1's block minimum [N, K/32]; q4_k/q5_k's super-block `dmin` [N, K/256].
  sc  uint8 [N, K/16]: per super-block of 256, q4_k/q5_k's eight 6-bit block scales then their
      eight 6-bit minimums; q6_k's sixteen int8 scales, one per 16 values.
Values: q4_0 (q - 8) d; q4_1 q d + m; q5_0 (q - 16) d; q5_1 q d + m; q8_0 q d;
q4_k/q5_k (d sc) q - (m mn); q6_k (d sc) (q - 32). These are ggml's own (the K-quants' nibble
layout is only rearranged into q4_0's block order), so a GGUF's weights import bit for bit
(convert/gguf_blocks.py). The converter quantizes float weights to the formats marked
`quantizable` (convert/quantize.py); the K-quants and 5-bit formats come only from GGUF files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelFormatError

BLOCK = 32
SUPER_BLOCK = 256


@dataclass(frozen=True)
class QuantFormat:
    name: str
    bits: int
    ggml_type: int  # GGUF's tensor type id
    row_multiple: int  # a row's length must be a multiple of this: 32, or 256 for the K-quants
    gguf_block_bytes: int  # bytes per GGUF block of row_multiple values (0 for float formats)
    planes: tuple[tuple[str, str, int], ...]  # (plane, numpy dtype, elements per 256 values)
    quantizable: bool = True  # whether the converter quantizes float weights to it

    @property
    def is_float(self) -> bool:
        return self.gguf_block_bytes == 0

    @property
    def k_quant(self) -> bool:
        return self.row_multiple == SUPER_BLOCK


FORMATS = {
    f.name: f
    for f in (
        QuantFormat("f32", 32, 0, 1, 0, (("", "float32", 256),)),
        QuantFormat("f16", 16, 1, 1, 0, (("", "float16", 256),)),
        QuantFormat("q4_0", 4, 2, BLOCK, 18, (("qs", "uint8", 128), ("d", "float16", 8))),
        QuantFormat("q4_1", 4, 3, BLOCK, 20, (("qs", "uint8", 128), ("d", "float16", 8), ("m", "float16", 8))),
        QuantFormat("q8_0", 8, 8, BLOCK, 34, (("qs", "int8", 256), ("d", "float16", 8))),
        QuantFormat("q5_0", 5, 6, BLOCK, 22, (("qs", "uint8", 128), ("qh", "uint8", 32), ("d", "float16", 8)),
                    quantizable=False),
        QuantFormat("q5_1", 5, 7, BLOCK, 24,
                    (("qs", "uint8", 128), ("qh", "uint8", 32), ("d", "float16", 8), ("m", "float16", 8)),
                    quantizable=False),
        QuantFormat("q4_k", 4, 12, SUPER_BLOCK, 144,
                    (("qs", "uint8", 128), ("d", "float16", 1), ("m", "float16", 1), ("sc", "uint8", 16)),
                    quantizable=False),
        QuantFormat("q5_k", 5, 13, SUPER_BLOCK, 176,
                    (("qs", "uint8", 128), ("qh", "uint8", 32), ("d", "float16", 1), ("m", "float16", 1),
                     ("sc", "uint8", 16)), quantizable=False),
        QuantFormat("q6_k", 6, 14, SUPER_BLOCK, 210,
                    (("qs", "uint8", 128), ("qh", "uint8", 64), ("d", "float16", 1), ("sc", "int8", 16)),
                    quantizable=False),
    )
}
FORMAT_BY_GGML_TYPE = {f.ggml_type: f for f in FORMATS.values()}
QUANTIZABLE = tuple(name for name, f in FORMATS.items() if f.quantizable)


def plane_key(name: str, plane: str) -> str:
    return f"{name}.{plane}" if plane else name


def plane_layout(fmt: QuantFormat, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """plane -> (dtype, shape) of a tensor of logical `shape` stored in `fmt`."""
    if fmt.is_float:
        return {"": (fmt.planes[0][1], tuple(shape))}
    rows, cols = shape
    return {p: (dt, (rows, cols * per_256 // SUPER_BLOCK)) for p, dt, per_256 in fmt.planes}


def unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [..., 16] -> uint8 [..., 32]: a block's elements in order (ggml's nibble order above)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def unpack_bits(words: np.ndarray) -> np.ndarray:
    """uint8 [..., 4] (a little-endian uint32 per block) -> uint8 [..., 32]: bit j as value j."""
    return np.unpackbits(np.ascontiguousarray(words), axis=-1, bitorder="little")


def block_values(planes: dict[str, np.ndarray], fmt: QuantFormat) -> np.ndarray:
    """The integer values q of every block as ggml defines them (before offsets): [N*K/32, 32]."""
    if fmt.name == "q8_0":
        return planes["qs"].reshape(-1, BLOCK).view(np.int8)
    q = unpack_nibbles(planes["qs"].reshape(-1, BLOCK // 2))
    if fmt.name in ("q5_0", "q5_1", "q5_k"):
        q = q | (unpack_bits(planes["qh"].reshape(-1, 4)) << np.uint8(4))
    elif fmt.name == "q6_k":
        high = planes["qh"].reshape(-1, 2, 4)
        q = q | (unpack_bits(high[:, 0]) << np.uint8(4)) | (unpack_bits(high[:, 1]) << np.uint8(5))
    return q


def dequantize(planes: dict[str, np.ndarray], fmt: QuantFormat) -> np.ndarray:
    """planes of `fmt` -> float32 [N, K] (or the float tensor's own shape), with the float32
    operations, in the order, of gguf's dequantize: the same bits."""
    if fmt.is_float:
        return np.asarray(planes[""], dtype=np.float32)
    rows = planes["qs"].shape[0]
    q = block_values(planes, fmt).astype(np.float32)  # [blocks, 32]
    if fmt.k_quant:
        d = np.repeat(planes["d"].reshape(-1).astype(np.float32), 8)  # one per block of 32
        if fmt.name == "q6_k":
            sc = planes["sc"].reshape(-1).view(np.int8).astype(np.float32).reshape(-1, 2)  # two per block
            scale = np.repeat(d[:, None] * sc, 16, axis=1)
            return (scale * (q - np.float32(32))).reshape(rows, -1)
        sc = planes["sc"].reshape(-1, 2, 8).astype(np.float32)
        scale = (d * sc[:, 0].reshape(-1))[:, None]
        low = (np.repeat(planes["m"].reshape(-1).astype(np.float32), 8) * sc[:, 1].reshape(-1))[:, None]
        return (scale * q - low).reshape(rows, -1)
    d = planes["d"].reshape(-1, 1).astype(np.float32)
    if fmt.name == "q4_0":
        x = (q - np.float32(8)) * d
    elif fmt.name == "q5_0":
        x = (q - np.float32(16)) * d
    elif fmt.name == "q8_0":
        x = q * d
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
        if plane in ("qs", "qh", "sc"):
            continue
        at = first_nonfinite(arr.view(np.uint16) if arr.dtype == np.float16 else arr)
        if at is not None:
            what = {"d": "block scale", "m": "block minimum", "": "value"}[plane]
            raise ModelFormatError(f"{where}: tensor {name!r} has a non-finite {what} (NaN or Inf) at element {at}")
