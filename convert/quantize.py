"""Quantizing float weights into edgephi's planes (edgephi/quant.py), and GGUF's interleaved blocks
to and from planes. Quantization is round-to-nearest with the same float32 arithmetic as the
`gguf` package."""

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
