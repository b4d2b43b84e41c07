"""Quantizing float weights into edgephi's planes (edgephi/quant.py): round-to-nearest with the
same float32 arithmetic as the `gguf` package. GGUF's own blocks are read in gguf_blocks.py."""

from __future__ import annotations

import numpy as np

from edgephi.quant import BLOCK, QuantFormat


def can_quantize(fmt: QuantFormat, shape: tuple[int, ...]) -> bool:
    return fmt.is_float or (len(shape) == 2 and shape[1] % BLOCK == 0)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q uint8 [n, 32] in 0..15 -> uint8 [n, 16], element j low, element j+16 high."""
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


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
    rows = x.shape[0]
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
