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


# -- quantizing by importance ---------------------------------------------------------------------
# With calibration, each block's scale (and q4_1's minimum) minimises the importance-weighted
# squared error sum_j w_j (x_j - x̂_j)^2, where w_j is the mean squared input of column j: to first
# order, the error the block adds to the layer's output. Candidate scales around round-to-nearest's
# are tried, each refined by weighted least squares for the levels it rounds to, and the scale
# that is stored (float16) is the one scored. The files stay ordinary q4_0/q4_1.

Q4_0_STEPS = np.arange(-12, 13, dtype=np.float32) / np.float32(10)  # levels the extreme value may take: 8 +- 1.2
Q4_1_STEPS = np.arange(-18, 19, dtype=np.float32) / np.float32(20)  # steps the range may span: 15 +- 0.9
REFINEMENTS = 2  # re-round to the best scale and solve again
WEIGHTED_BLOCKS = 4096  # blocks searched at a time
IMPORTANCE_FLOOR = 1e-2  # of a row's mean importance: columns never seen still count a little


def importance_weights(x: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """(rows * K / 32, 32) float32 weights of x (rows, K) from importance (K,) (mean squared input)."""
    w = np.asarray(importance, np.float32)
    w = w + np.float32(IMPORTANCE_FLOOR) * np.float32(w.mean() if w.size else 0) + np.float32(1e-30)
    return np.broadcast_to(w, x.shape).reshape(-1, BLOCK)


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(np.float32)


def _weighted_scale(x, w, levels):
    """Least-squares d for x ~ d * levels, weighted; 0 where all levels are 0."""
    num = (w * x * levels).sum(axis=1, keepdims=True)
    den = (w * levels * levels).sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.float32(0)).astype(np.float32)


def _q4_0_levels(x, d):
    """Signed levels -8..7 of x at scale d (0 where d is 0)."""
    return np.clip(np.rint(x * _reciprocal_or_zero(d)), -8, 7)


def _q4_0_weighted(blocks: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d float16 (n, 1), levels int (n, 32) in -8..7) minimising the weighted error."""
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
    best_err = np.full((len(blocks), 1), np.inf, np.float32)
    best_d = np.zeros((len(blocks), 1), np.float32)
    for step in (None, *Q4_0_STEPS):  # None: round-to-nearest's own scale, so no block ends up worse
        d = _f16(extreme / np.float32(-8)) if step is None else extreme / -(np.float32(8) + step)
        for _ in range(0 if step is None else REFINEMENTS):
            levels = _q4_0_levels(blocks, d)
            d = _f16(_weighted_scale(blocks, w, levels))
        levels = _q4_0_levels(blocks, d)
        err = (w * (blocks - d * levels) ** 2).sum(axis=1, keepdims=True)
        better = err < best_err
        best_err, best_d = np.where(better, err, best_err), np.where(better, d, best_d)
    return best_d.astype(np.float16), _q4_0_levels(blocks, best_d)


def _q4_1_fit(x, w, levels):
    """Weighted least squares m, d for x ~ m + d * levels (float16-rounded)."""
    s0 = w.sum(axis=1, keepdims=True)
    s1 = (w * levels).sum(axis=1, keepdims=True)
    s2 = (w * levels * levels).sum(axis=1, keepdims=True)
    sx = (w * x).sum(axis=1, keepdims=True)
    sxl = (w * x * levels).sum(axis=1, keepdims=True)
    det = s0 * s2 - s1 * s1
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = det > s0 * s2 * np.float32(1e-6)
        d = np.where(ok, (s0 * sxl - s1 * sx) / det, np.float32(0))
        m = np.where(ok, (sx - d * s1) / s0, sx / s0)
    return _f16(m.astype(np.float32)), _f16(d.astype(np.float32))


def _q4_1_levels(x, m, d):
    return np.clip(np.rint((x - m) * _reciprocal_or_zero(d)), 0, 15)


def _q4_1_weighted(blocks: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, m float16 (n, 1), levels (n, 32) in 0..15) minimising the weighted error."""
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    best_err = np.full((len(blocks), 1), np.inf, np.float32)
    best_m, best_d = _f16(lo), np.zeros((len(blocks), 1), np.float32)
    for step in (None, *Q4_1_STEPS):  # None: round-to-nearest's own minimum and scale
        if step is None:
            m, d = _f16(lo), _f16((hi - lo) / np.float32(15))
        else:
            m, d = lo, (hi - lo) / (np.float32(15) + step)
        for _ in range(0 if step is None else REFINEMENTS):
            m, d = _q4_1_fit(blocks, w, _q4_1_levels(blocks, m, d))
        levels = _q4_1_levels(blocks, m, d)
        err = (w * (blocks - m - d * levels) ** 2).sum(axis=1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_m, best_d = np.where(better, m, best_m), np.where(better, d, best_d)
    return best_d.astype(np.float16), best_m.astype(np.float16), _q4_1_levels(blocks, best_m, best_d)


def quantize_weighted(x: np.ndarray, fmt: QuantFormat, importance: np.ndarray) -> dict[str, np.ndarray]:
    """x float [N, K] -> planes of q4_0 or q4_1 chosen by importance (K,); other formats round to nearest."""
    if fmt.name not in ("q4_0", "q4_1"):
        return quantize(x, fmt)
    rows = x.shape[0]
    blocks = np.asarray(x, dtype=np.float32).reshape(-1, BLOCK)
    w = importance_weights(x, importance)
    parts = []
    for start in range(0, len(blocks), WEIGHTED_BLOCKS):  # temporaries that stay in cache: 25% faster
        b, wb = blocks[start:start + WEIGHTED_BLOCKS], w[start:start + WEIGHTED_BLOCKS]
        if fmt.name == "q4_0":
            d, levels = _q4_0_weighted(b, wb)
            parts.append({"qs": _pack_nibbles((levels + 8).astype(np.uint8)), "d": d})
        else:
            d, m, levels = _q4_1_weighted(b, wb)
            parts.append({"qs": _pack_nibbles(levels.astype(np.uint8)), "d": d, "m": m})
    return {p: np.concatenate([part[p] for part in parts]).reshape(rows, -1) for p in parts[0]}
