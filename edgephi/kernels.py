"""Numba CPU kernels over plain arrays. Each has a numpy twin in tests/test_kernels.py.

A linear weight is the tuple (fmt, qs, s, m, f):
  fmt  ggml type id: 0 f32, 1 f16, 2 q4_0, 3 q4_1, 8 q8_0
  qs   uint8 [N, K/2] (q4) or [N, K] (q8_0 as uint8 bits)   packed values, else empty
  s    uint16 [N, K/32] f16 bits of block scales (q4/q8), or [N, K] f16 weights (f16)
  m    uint16 [N, K/32] f16 bits of q4_1 block minimums, else empty
  f    float32 [N, K] (f32), else empty
numba has no float16 type, so f16 values travel as uint16 bits and widen with f16_to_f32.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import jit_cache  # noqa: F401  (sets numba's cache folder before any kernel compiles)
from .simd import (PAIR_BYTES, ROWS_CHUNK, TILE_TOKENS, USE_VNNI, q4_0_row_dot, q4_0_tile_dot, q4_1_row_dot, q4_1_tile_dot,
                   q8_0_row_dot, q8_0_tile_dot, rows_dot_chunk, weighted_rows_sum)

F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8

# Kernels with prange loops (and callers of them) are not cached on their own: numba's cached code
# for a function that calls another cached parallel kernel can hold a null pointer to that
# kernel's gufunc when the two were compiled in different processes (seen here as a segfault
# in forward). forward() is cached and compiles them in-process, so its cache is whole.
CACHE_PARALLEL = False


@intrinsic
def f16_to_f32(typingctx, bits):
    """float16 bits (uint16) -> float32: LLVM's fpext, one vcvtph2ps per 8 or 16 values on x86."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_f16(typingctx, value):
    """float32 -> float16 bits, rounding to nearest even (as numpy's astype)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


def activation_scratch(tokens: int, width: int):
    """The scratch linear() needs for inputs of up to `tokens` rows of `width` values."""
    blocks = (tokens, width // 32)
    return (np.zeros((tokens, width), np.int16), np.zeros((tokens, 2 * width), np.uint8),
            np.zeros(blocks, np.float32), np.zeros(blocks, np.float32))


@njit(cache=True, fastmath=True)
def quantize_activations(x, xq, xb, xd, xs):
    """x (K,) float32 -> x_hat[32b + j] = xq[32b + j] * xd[b] with xq int16 and xs[b] = sum_j x_hat[32b + j].
    The decode kernels take activations in this form so that a block's dot is integer work. The
    block sums are of x_hat, not x: then a q4 row's error is W . (x_hat - x), with no extra term
    from its uncentered nibbles. Where the AVX-512 VNNI q4 dots run, xb (2K,) holds each full pair
    of blocks' xq again as PAIR_BYTES bytes in PAIR_ORDER: the low bytes, then the high bytes."""
    n_blocks = x.shape[0] // 32
    for b in range(n_blocks):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[b * 32 + j]))
        inv = np.float32(32767.0) / amax if amax > 0 else np.float32(0.0)
        total = 0
        for j in range(32):
            q = np.int16(round(x[b * 32 + j] * inv))
            xq[b * 32 + j] = q
            total += q
            if USE_VNNI and b < n_blocks - n_blocks % 2:
                # PAIR_ORDER: A 0..15, B 0..15, A 16..31, B 16..31
                at = (b // 2) * PAIR_BYTES + (b % 2) * 16 + (j % 16) + (j // 16) * 32
                xb[at] = np.uint8(q & 255)
                xb[at + PAIR_BYTES // 2] = np.uint8((q >> 8) & 255)
        xd[b] = amax / np.float32(32767.0)
        xs[b] = np.float32(total) * xd[b]


@njit(cache=CACHE_PARALLEL, parallel=True)
def _quantize_rows(x, xq, xb, xd, xs):
    for t in prange(x.shape[0]):
        quantize_activations(x[t], xq[t], xb[t], xd[t], xs[t])


TOKEN_BLOCK_BYTES = 192 * 1024  # int16 activations per token block: stays in a core's L2 while rows stream


@njit(cache=True, inline="always")
def _tile_dot(fmt, qs, d, m, xq, xb, xd, xs, n, t):
    if fmt == Q4_1:
        return q4_1_tile_dot(qs, d, m, xq, xb, xd, xs, n, t)
    if fmt == Q4_0:
        return q4_0_tile_dot(qs, d, m, xq, xb, xd, xs, n, t)
    return q8_0_tile_dot(qs, d, m, xq, xb, xd, xs, n, t)


@njit(cache=True, inline="always")
def _row_dot(fmt, qs, d, m, xq, xb, xd, xs, n, t):
    if fmt == Q4_1:
        return q4_1_row_dot(qs, d, m, xq, xb, xd, xs, n, t)
    if fmt == Q4_0:
        return q4_0_row_dot(qs, d, m, xq, xb, xd, xs, n, t)
    return q8_0_row_dot(qs, d, m, xq, xb, xd, xs, n, t)


@njit(cache=CACHE_PARALLEL, parallel=True)
def _matmul_quant_block(fmt, qs, d, m, xq, xb, xd, xs, out, t_start, t_stop):
    """out[t, n] for t_start <= t < t_stop: one weight row per task, tokens in tiles of TILE_TOKENS
    (each block of weights unpacked once for four of them), then single tokens."""
    if t_stop - t_start == 1:  # decode: nothing but the row dots in the parallel loop
        for n in prange(out.shape[1]):
            out[t_start, n] = _row_dot(fmt, qs, d, m, xq, xb, xd, xs, n, t_start)
        return
    tiled = t_stop - (t_stop - t_start) % TILE_TOKENS
    for n in prange(out.shape[1]):
        for t in range(t_start, tiled, TILE_TOKENS):
            out[t, n], out[t + 1, n], out[t + 2, n], out[t + 3, n] = _tile_dot(fmt, qs, d, m, xq, xb, xd, xs, n, t)
        for t in range(tiled, t_stop):
            out[t, n] = _row_dot(fmt, qs, d, m, xq, xb, xd, xs, n, t)


@njit(cache=CACHE_PARALLEL)
def _matmul_quant(fmt, qs, d, m, xq, xb, xd, xs, out):
    """out[t, n] = W[n] . x[t] for q4_0 / q4_1 / q8_0 rows, x given by quantize_activations.
    Tokens go in blocks whose activations fit in L2: every row then reads them from there, not
    from L3 or memory (with 3072-wide inputs, 256 tokens are 1.5 MB). One row per task measured
    faster than tiles of rows with these block dots."""
    T = out.shape[0]
    K = d.shape[1] * 32
    block = max(TILE_TOKENS, TOKEN_BLOCK_BYTES // (2 * K) // TILE_TOKENS * TILE_TOKENS)
    for t in range(0, T, block):
        _matmul_quant_block(fmt, qs, d, m, xq, xb, xd, xs, out, t, min(T, t + block))


@njit(cache=True, fastmath=True)
def _dequantize_row(fmt, qs, s, m, f, n, row):
    """row[:] = W[n, :] as float32."""
    K = row.shape[0]
    if fmt == F32:
        for k in range(K):
            row[k] = f[n, k]
    elif fmt == F16:
        for k in range(K):
            row[k] = f16_to_f32(s[n, k])
    elif fmt == Q8_0:
        for b in range(K // 32):
            scale = f16_to_f32(s[n, b])
            for j in range(32):
                row[b * 32 + j] = np.float32(np.int8(qs[n, b * 32 + j])) * scale
    else:
        for b in range(K // 32):
            scale = f16_to_f32(s[n, b])
            low = f16_to_f32(m[n, b]) if fmt == Q4_1 else np.float32(-8.0) * scale
            for j in range(16):
                byte = qs[n, b * 16 + j]
                row[b * 32 + j] = np.float32(byte & 15) * scale + low
                row[b * 32 + 16 + j] = np.float32(byte >> 4) * scale + low


@njit(cache=CACHE_PARALLEL, parallel=True, fastmath=True)
def _matmul(fmt, qs, s, m, f, x, out):
    """out (T, N) = x (T, K) @ W.T: each row of W is widened once, then used for all T tokens."""
    T, K = x.shape
    for n in prange(out.shape[1]):
        row = np.empty(K, np.float32)
        _dequantize_row(fmt, qs, s, m, f, n, row)
        for t in range(T):
            acc = np.float32(0.0)
            for k in range(K):
                acc += row[k] * x[t, k]
            out[t, n] = acc


@njit(cache=CACHE_PARALLEL, parallel=True, fastmath=True)
def _matvec_float(fmt, s, f, x, out):
    K = x.shape[0]
    for n in prange(out.shape[0]):
        acc = np.float32(0.0)
        if fmt == F32:
            for k in range(K):
                acc += f[n, k] * x[k]
        else:
            for k in range(K):
                acc += f16_to_f32(s[n, k]) * x[k]
        out[n] = acc


@njit(cache=True)
def count_nonfinite(x):
    """NaNs and Infs in a C-contiguous float32 array, read as bits: an integer reduction that
    vectorises without fastmath (which would assume there are none)."""
    bits = x.reshape(-1).view(np.uint32)
    n = 0
    for i in range(bits.shape[0]):
        n += (bits[i] & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return n


@njit(cache=CACHE_PARALLEL)
def linear(w, x, out, scratch):
    """out[t, n] = sum_k W[n, k] * x[t, k]   x (T, K) float32, out (T, N) float32; returns how many
    values of x are NaN or Inf. The kernels below are fastmath, which assumes there are none and
    may turn them into zeros: a model whose activations overflow would answer garbage, not fail.
    scratch: activation_scratch(>= T, >= K), where quantized weights read x as int16 per block."""
    fmt, qs, s, m, f = w
    T = x.shape[0]
    nonfinite = count_nonfinite(x)
    if fmt == Q4_0 or fmt == Q4_1 or fmt == Q8_0:
        xq, xb, xd, xs = scratch
        if T == 1:
            quantize_activations(x[0], xq[0], xb[0], xd[0], xs[0])
        else:
            _quantize_rows(x, xq, xb, xd, xs)
        _matmul_quant(fmt, qs, s, m, xq, xb, xd, xs, out)
    elif T > 1:
        _matmul(fmt, qs, s, m, f, x, out)
    else:
        _matvec_float(fmt, s, f, x[0], out[0])
    return nonfinite


@njit(cache=True)
def embed_rows(w, tokens, out):
    """out[t] = row tokens[t] of the embedding matrix, dequantized."""
    fmt, qs, s, m, f = w
    D = out.shape[1]
    for t in range(tokens.shape[0]):
        r = tokens[t]
        if fmt == F32 or fmt == F16:  # float rows may have any width
            for k in range(D):
                out[t, k] = f[r, k] if fmt == F32 else f16_to_f32(s[r, k])
            continue
        for b in range(D // 32):
            for j in range(32):
                k = b * 32 + j
                if fmt == Q8_0:
                    v = np.float32(np.int8(qs[r, k])) * f16_to_f32(s[r, b])
                else:
                    byte = qs[r, b * 16 + (j % 16)]
                    q = np.float32(byte & 15) if j < 16 else np.float32(byte >> 4)
                    if fmt == Q4_0:
                        v = (q - np.float32(8.0)) * f16_to_f32(s[r, b])
                    else:
                        v = q * f16_to_f32(s[r, b]) + f16_to_f32(m[r, b])
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
        if ss == np.inf:  # activations past 1e19: the norm would quietly give zeros, so poison it
            scale = np.float32(np.nan)
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


def widen(value):
    """A KV cache element as float32: the cache holds float16 bits (uint16) or float32."""


def narrow(value, like):
    """A float32 value in the element type of the cache `like`."""


@overload(widen)
def _widen(value):
    if value == types.uint16:
        return lambda value: f16_to_f32(value)
    return lambda value: value


@overload(narrow)
def _narrow(value, like):
    if like.dtype == types.uint16:
        return lambda value, like: f32_to_f16(value)
    return lambda value, like: value


@njit(cache=True)
def store_kv(qkv, slots, k_cache, v_cache, n_heads, n_kv_heads, head_dim):
    """Write the new tokens' k and v into cache slots. k_cache (C, Hk * Dh) f16 bits or float32."""
    q_width = n_heads * head_dim
    kv_width = n_kv_heads * head_dim
    for t in range(qkv.shape[0]):
        s = slots[t]
        for j in range(kv_width):
            k_cache[s, j] = narrow(qkv[t, q_width + j], k_cache)
            v_cache[s, j] = narrow(qkv[t, q_width + kv_width + j], v_cache)


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(cache=True, fastmath=True, inline="always")
def exp_nonpositive(x):
    """exp(x) for x <= 0 in plain arithmetic (Cephes' expf polynomial, < 2 ulp), so that a loop
    of them vectorises; libm's exp is one call per value. Below -87 (and for -inf) it is 0."""
    n = math.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    e = max(n, np.float32(-126.0))  # keeps the exponent bits valid; the select below zeroes these
    return p * _f32_from_bits(np.int32(e + np.float32(127.0)) << 23) if x > np.float32(-87.0) else np.float32(0.0)


@njit(cache=True, fastmath=True)
def _dot(q, k):
    acc = np.float32(0.0)
    for j in range(q.shape[0]):
        acc += q[j] * widen(k[j])
    return acc


@njit(cache=True, fastmath=True)
def _axpy(w, v, out):
    for j in range(out.shape[0]):
        out[j] += w * widen(v[j])


@njit(cache=CACHE_PARALLEL, parallel=True, fastmath=True)
def attention(qkv, positions, k_cache, v_cache, slot_pos, n_slots, window, n_heads, n_kv_heads, head_dim,
              scores, out):
    """Causal attention of each new token over the cache slots holding earlier-or-equal positions
    (and, with a sliding window > 0, positions > pos - window), one (token, head) per task.
    scores (T * H, C) scratch; out (T, H * Dh). Rows are taken as slices: LLVM vectorises the
    dot and axpy loops over them (with float16 widened by vcvtph2ps), unlike 2-D indexing here."""
    T = qkv.shape[0]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    # Until the ring wraps, slots hold increasing positions: the slots a token may see are then a
    # prefix, and a prefill token stops there instead of scoring the later ones only to mask them.
    ordered = n_slots > 0 and slot_pos[0] >= 0
    for s in range(1, n_slots):
        if slot_pos[s] <= slot_pos[s - 1]:
            ordered = False
            break
    for th in prange(T * n_heads):
        t = th // n_heads
        h = th % n_heads
        pos = positions[t]
        q = qkv[t, h * head_dim:(h + 1) * head_dim]
        kv = (h // group) * head_dim
        row = scores[th]
        n = np.searchsorted(slot_pos[:n_slots], pos, side="right") if ordered else n_slots
        chunked = head_dim - head_dim % ROWS_CHUNK
        for c in range(0, chunked, ROWS_CHUNK):
            rows_dot_chunk(qkv[t], h * head_dim + c, n, k_cache, kv + c, row, c > 0)
        best = np.float32(-np.inf)
        for s in range(n):
            p = slot_pos[s]
            if p < 0 or p > pos or (window > 0 and p <= pos - window):
                row[s] = -np.inf
            else:
                if chunked < head_dim:
                    partial = row[s] if chunked > 0 else np.float32(0.0)
                    row[s] = partial + _dot(q[chunked:], k_cache[s, kv + chunked:kv + head_dim])
                row[s] *= scale
                best = max(best, row[s])
        total = np.float32(0.0)
        for s in range(n):
            row[s] = exp_nonpositive(row[s] - best)
            total += row[s]
        inv = np.float32(1.0) / total
        for s in range(n):
            row[s] *= inv
        o0 = h * head_dim
        chunked = head_dim - head_dim % ROWS_CHUNK
        for c in range(0, chunked, ROWS_CHUNK):
            weighted_rows_sum(row, n, v_cache, kv + c, out[t], o0 + c)
        if chunked < head_dim:  # head dims that are not a multiple of 32 (small test models)
            o = out[t, o0 + chunked:o0 + head_dim]
            o[:] = 0.0
            for s in range(n):
                if row[s] != 0.0:
                    _axpy(row[s], v_cache[s, kv + chunked:kv + head_dim], o)


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
