"""Numba CPU kernels over plain arrays. Each has a numpy twin in tests/test_kernels.py.

A linear weight is the tuple (fmt, qs, s, m, f):
  fmt  ggml type id: 0 f32, 1 f16, 2 q4_0, 3 q4_1, 8 q8_0
  qs   uint8 [N, K/2] (q4) or [N, K] (q8_0 as uint8 bits)   packed values, else empty
  s    uint16 [N, K/32] f16 bits of block scales (q4/q8), or [N, K] f16 weights (f16)
  m    uint16 [N, K/32] f16 bits of q4_1 block minimums, else empty
  f    float32 [N, K] (f32), else empty
numba cannot load float16, so f16 values travel as uint16 bits and widen through a table.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import jit_cache  # noqa: F401  (sets numba's cache folder before any kernel compiles)

F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)  # (65536,)


@njit(cache=True)
def f32_bits_to_f16_bits(bits32):
    """IEEE float32 bits -> float16 bits, round to nearest even (what numpy's astype does)."""
    bits = np.int64(bits32)
    sign = (bits >> 16) & 0x8000
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    if exp == 0xFF:  # inf or nan
        return np.uint16(sign | 0x7C00 | (0x200 if mant else 0))
    e = exp - 127 + 15
    if e >= 31:
        return np.uint16(sign | 0x7C00)
    if e <= 0:  # subnormal half (or zero)
        if e < -10:
            return np.uint16(sign)
        mant = mant | 0x800000
        shift = 14 - e
        half = mant >> shift
        rem = mant & ((1 << shift) - 1)
        mid = 1 << (shift - 1)
        if rem > mid or (rem == mid and (half & 1)):
            half += 1
        return np.uint16(sign | half)
    half = (e << 10) | (mant >> 13)
    rem = mant & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (half & 1)):
        half += 1  # may carry into the exponent, which is still right
    return np.uint16(sign | half)


@njit(cache=True, fastmath=True)
def _q4_block_dot(qs, n, b, x):
    """sum_j q[n, b*32 + j] * x[b*32 + j] over one block (nibbles as 0..15)."""
    part = np.float32(0.0)
    for j in range(16):
        part += np.float32(qs[n, b * 16 + j] & np.uint8(15)) * x[b * 32 + j]
    for j in range(16):
        part += np.float32(qs[n, b * 16 + j] >> np.uint8(4)) * x[b * 32 + 16 + j]
    return part


@njit(cache=True, parallel=True, fastmath=True)
def _matvec_q4(qs, d, m, has_min, x, out, lut):
    """out[n] = W[n] . x for q4_0 (values q - 8) or q4_1 (has_min: q * d + m).
    Four rows share each load of x; low and high nibbles run as two 16-wide loops, which LLVM
    vectorises (measured 4x faster than one row at a time); the block sums of x fold in the
    -8 offset or the q4_1 minimum once per block."""
    N = out.shape[0]
    nb = x.shape[0] // 32
    xsum = np.empty(nb, np.float32)
    for b in range(nb):
        acc = np.float32(0.0)
        for j in range(32):
            acc += x[b * 32 + j]
        xsum[b] = acc
    for g in prange((N + 3) // 4):
        n = g * 4
        if n + 4 <= N:
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for b in range(nb):
                p0 = p1 = p2 = p3 = np.float32(0.0)
                for j in range(16):
                    xa = x[b * 32 + j]
                    p0 += np.float32(qs[n, b * 16 + j] & np.uint8(15)) * xa
                    p1 += np.float32(qs[n + 1, b * 16 + j] & np.uint8(15)) * xa
                    p2 += np.float32(qs[n + 2, b * 16 + j] & np.uint8(15)) * xa
                    p3 += np.float32(qs[n + 3, b * 16 + j] & np.uint8(15)) * xa
                for j in range(16):
                    xb = x[b * 32 + 16 + j]
                    p0 += np.float32(qs[n, b * 16 + j] >> np.uint8(4)) * xb
                    p1 += np.float32(qs[n + 1, b * 16 + j] >> np.uint8(4)) * xb
                    p2 += np.float32(qs[n + 2, b * 16 + j] >> np.uint8(4)) * xb
                    p3 += np.float32(qs[n + 3, b * 16 + j] >> np.uint8(4)) * xb
                if has_min:
                    xs = xsum[b]
                    a0 += lut[d[n, b]] * p0 + lut[m[n, b]] * xs
                    a1 += lut[d[n + 1, b]] * p1 + lut[m[n + 1, b]] * xs
                    a2 += lut[d[n + 2, b]] * p2 + lut[m[n + 2, b]] * xs
                    a3 += lut[d[n + 3, b]] * p3 + lut[m[n + 3, b]] * xs
                else:
                    xs = np.float32(8.0) * xsum[b]
                    a0 += lut[d[n, b]] * (p0 - xs)
                    a1 += lut[d[n + 1, b]] * (p1 - xs)
                    a2 += lut[d[n + 2, b]] * (p2 - xs)
                    a3 += lut[d[n + 3, b]] * (p3 - xs)
            out[n], out[n + 1], out[n + 2], out[n + 3] = a0, a1, a2, a3
        else:
            for r in range(n, N):
                acc = np.float32(0.0)
                for b in range(nb):
                    part = _q4_block_dot(qs, r, b, x)
                    if has_min:
                        acc += lut[d[r, b]] * part + lut[m[r, b]] * xsum[b]
                    else:
                        acc += lut[d[r, b]] * (part - np.float32(8.0) * xsum[b])
                out[r] = acc


@njit(cache=True, fastmath=True)
def _q8_block_dot(q, n, b, x):
    part = np.float32(0.0)
    for j in range(32):
        part += np.float32(q[n, b * 32 + j]) * x[b * 32 + j]
    return part


@njit(cache=True, parallel=True, fastmath=True)
def _matvec_q8(qs, d, x, out, lut):
    """out[n] = W[n] . x for q8_0, four rows per step as in _matvec_q4."""
    N = out.shape[0]
    nb = x.shape[0] // 32
    q = qs.view(np.int8)
    for g in prange((N + 3) // 4):
        n = g * 4
        if n + 4 <= N:
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for b in range(nb):
                p0 = p1 = p2 = p3 = np.float32(0.0)
                for j in range(32):
                    xv = x[b * 32 + j]
                    p0 += np.float32(q[n, b * 32 + j]) * xv
                    p1 += np.float32(q[n + 1, b * 32 + j]) * xv
                    p2 += np.float32(q[n + 2, b * 32 + j]) * xv
                    p3 += np.float32(q[n + 3, b * 32 + j]) * xv
                a0 += lut[d[n, b]] * p0
                a1 += lut[d[n + 1, b]] * p1
                a2 += lut[d[n + 2, b]] * p2
                a3 += lut[d[n + 3, b]] * p3
            out[n], out[n + 1], out[n + 2], out[n + 3] = a0, a1, a2, a3
        else:
            for r in range(n, N):
                acc = np.float32(0.0)
                for b in range(nb):
                    acc += lut[d[r, b]] * _q8_block_dot(q, r, b, x)
                out[r] = acc


@njit(cache=True, fastmath=True)
def _dequantize_row(fmt, qs, s, m, f, n, row, lut):
    """row[:] = W[n, :] as float32."""
    K = row.shape[0]
    if fmt == F32:
        for k in range(K):
            row[k] = f[n, k]
    elif fmt == F16:
        for k in range(K):
            row[k] = lut[s[n, k]]
    elif fmt == Q8_0:
        for b in range(K // 32):
            scale = lut[s[n, b]]
            for j in range(32):
                row[b * 32 + j] = np.float32(np.int8(qs[n, b * 32 + j])) * scale
    else:
        for b in range(K // 32):
            scale = lut[s[n, b]]
            low = lut[m[n, b]] if fmt == Q4_1 else np.float32(-8.0) * scale
            for j in range(16):
                byte = qs[n, b * 16 + j]
                row[b * 32 + j] = np.float32(byte & 15) * scale + low
                row[b * 32 + 16 + j] = np.float32(byte >> 4) * scale + low


@njit(cache=True, parallel=True, fastmath=True)
def _matmul(fmt, qs, s, m, f, x, out, lut):
    """out (T, N) = x (T, K) @ W.T: each row of W is widened once, then used for all T tokens."""
    T, K = x.shape
    for n in prange(out.shape[1]):
        row = np.empty(K, np.float32)
        _dequantize_row(fmt, qs, s, m, f, n, row, lut)
        for t in range(T):
            acc = np.float32(0.0)
            for k in range(K):
                acc += row[k] * x[t, k]
            out[t, n] = acc


@njit(cache=True, parallel=True, fastmath=True)
def _matvec_float(fmt, s, f, x, out, lut):
    K = x.shape[0]
    for n in prange(out.shape[0]):
        acc = np.float32(0.0)
        if fmt == F32:
            for k in range(K):
                acc += f[n, k] * x[k]
        else:
            for k in range(K):
                acc += lut[s[n, k]] * x[k]
        out[n] = acc


@njit(cache=True)
def linear(w, x, out, lut):
    """out[t, n] = sum_k W[n, k] * x[t, k]   x (T, K) float32, out (T, N) float32."""
    fmt, qs, s, m, f = w
    if x.shape[0] > 1:
        _matmul(fmt, qs, s, m, f, x, out, lut)
    elif fmt == Q4_0 or fmt == Q4_1:
        _matvec_q4(qs, s, m, fmt == Q4_1, x[0], out[0], lut)
    elif fmt == Q8_0:
        _matvec_q8(qs, s, x[0], out[0], lut)
    else:
        _matvec_float(fmt, s, f, x[0], out[0], lut)


@njit(cache=True)
def embed_rows(w, tokens, out, lut):
    """out[t] = row tokens[t] of the embedding matrix, dequantized."""
    fmt, qs, s, m, f = w
    D = out.shape[1]
    for t in range(tokens.shape[0]):
        r = tokens[t]
        if fmt == F32 or fmt == F16:  # float rows may have any width
            for k in range(D):
                out[t, k] = f[r, k] if fmt == F32 else lut[s[r, k]]
            continue
        for b in range(D // 32):
            for j in range(32):
                k = b * 32 + j
                if fmt == F32:
                    v = f[r, k]
                elif fmt == F16:
                    v = lut[s[r, k]]
                elif fmt == Q8_0:
                    v = np.float32(np.int8(qs[r, k])) * lut[s[r, b]]
                else:
                    byte = qs[r, b * 16 + (j % 16)]
                    q = np.float32(byte & 15) if j < 16 else np.float32(byte >> 4)
                    if fmt == Q4_0:
                        v = (q - np.float32(8.0)) * lut[s[r, b]]
                    else:
                        v = q * lut[s[r, b]] + lut[m[r, b]]
                out[t, k] = v


@njit(cache=True)
def rmsnorm(x, weight, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight   x, out (T, D)."""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for k in range(D):
            ss += x[t, k] * x[t, k]
        scale = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(D) + np.float32(eps)))
        for k in range(D):
            out[t, k] = weight[k] * (x[t, k] * scale)


@njit(cache=True)
def rope(qkv, positions, inv_freq, attention_factor, n_heads, n_kv_heads, head_dim, rotary_dim):
    """Rotate the first rotary_dim dims of every q and k head in place (rotate_half pairing:
    dim i with i + R/2). qkv (T, (H + 2Hk) * Dh); positions (T,) absolute; inv_freq (R/2,)."""
    half = rotary_dim // 2
    for t in range(qkv.shape[0]):
        pos = np.float32(positions[t])
        for i in range(half):
            angle = pos * inv_freq[i]  # float32 product, as transformers computes it
            c = np.float32(math.cos(angle)) * attention_factor
            sn = np.float32(math.sin(angle)) * attention_factor
            for h in range(n_heads + n_kv_heads):
                base = h * head_dim
                a = qkv[t, base + i]
                b = qkv[t, base + half + i]
                qkv[t, base + i] = a * c - b * sn
                qkv[t, base + half + i] = b * c + a * sn


def kv_load(cache, s, j, lut):
    """cache[s, j] as float32; the KV cache holds float16 bits (uint16) or float32."""


def kv_store(cache, s, j, value, bits):
    """cache[s, j] = value; bits is value's float32 bit pattern (for the float16 cache)."""


@overload(kv_load)
def _kv_load(cache, s, j, lut):
    if cache.dtype == types.uint16:
        return lambda cache, s, j, lut: lut[cache[s, j]]
    return lambda cache, s, j, lut: cache[s, j]


@overload(kv_store)
def _kv_store(cache, s, j, value, bits):
    if cache.dtype == types.uint16:
        def store_f16(cache, s, j, value, bits):
            cache[s, j] = f32_bits_to_f16_bits(bits)
        return store_f16

    def store_f32(cache, s, j, value, bits):
        cache[s, j] = value
    return store_f32


@njit(cache=True)
def store_kv(qkv, slots, k_cache, v_cache, n_heads, n_kv_heads, head_dim):
    """Write the new tokens' k and v into cache slots. k_cache (C, Hk * Dh) f16 bits or float32."""
    q_width = n_heads * head_dim
    kv_width = n_kv_heads * head_dim
    bits = qkv.view(np.uint32)
    for t in range(qkv.shape[0]):
        s = slots[t]
        for j in range(kv_width):
            kv_store(k_cache, s, j, qkv[t, q_width + j], bits[t, q_width + j])
            kv_store(v_cache, s, j, qkv[t, q_width + kv_width + j], bits[t, q_width + kv_width + j])


@njit(cache=True, parallel=True)
def attention(qkv, positions, k_cache, v_cache, slot_pos, n_slots, window, n_heads, n_kv_heads, head_dim,
              lut, scores, out):
    """Causal attention of each new token over the cache slots holding earlier-or-equal positions
    (and, with a sliding window > 0, positions > pos - window).
    scores (T * H, C) scratch; out (T, H * Dh)."""
    T = qkv.shape[0]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for th in prange(T * n_heads):
        t = th // n_heads
        h = th % n_heads
        kvh = h // group
        pos = positions[t]
        qbase = h * head_dim
        kbase = kvh * head_dim
        best = np.float32(-np.inf)
        for s in range(n_slots):
            p = slot_pos[s]
            if p < 0 or p > pos or (window > 0 and p <= pos - window):
                scores[th, s] = -np.inf
                continue
            acc = np.float32(0.0)
            for j in range(head_dim):
                acc += qkv[t, qbase + j] * kv_load(k_cache, s, kbase + j, lut)
            acc *= scale
            scores[th, s] = acc
            if acc > best:
                best = acc
        total = np.float32(0.0)
        for s in range(n_slots):
            e = np.float32(math.exp(scores[th, s] - best)) if scores[th, s] != -np.inf else np.float32(0.0)
            scores[th, s] = e
            total += e
        for j in range(head_dim):
            out[t, qbase + j] = 0.0
        for s in range(n_slots):
            wgt = scores[th, s] / total
            if wgt != 0.0:
                for j in range(head_dim):
                    out[t, qbase + j] += wgt * kv_load(v_cache, s, kbase + j, lut)


@njit(cache=True)
def silu_mul(gate_up, out):
    """out = silu(gate) * up, with gate the first F columns of gate_up (T, 2F) and up the rest."""
    F = out.shape[1]
    for t in range(out.shape[0]):
        for k in range(F):
            g = gate_up[t, k]
            out[t, k] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * gate_up[t, F + k]


@njit(cache=True)
def add_into(x, y):
    for t in range(x.shape[0]):
        for k in range(x.shape[1]):
            x[t, k] += y[t, k]
