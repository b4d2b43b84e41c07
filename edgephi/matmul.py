"""Linear layers in jitted code: out = x @ W.T for every format of records.Linear.

Quantized weights meet activations quantized to int16 per block of 32 (quantize_activations) in
the IR row dots of row_dot.py; float weights are widened row by row. Each has a numpy twin in
tests/test_kernels.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .float16 import f16_to_f32
from .gemm_tile import PAIRS, panel_shape, panel_tile, repack_panel
from .isa_ops import ACTIVATION_MAX, PAIR_BYTES, pair_byte_index, split_byte_index
from .quant import FORMATS
from .row_dot import TILE_TOKENS, row_dot, tile_dot, tile_dot2, tile_dot3

F32, F16, Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K = (
    FORMATS[name].ggml_type for name in ("f32", "f16", "q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"))

# Kernels with prange loops (and callers of them) are not cached on their own: numba's cached code
# for a function that calls another cached parallel kernel can hold a null pointer to that
# kernel's gufunc when the two were compiled in different processes (seen here as a segfault
# in forward). forward() is cached and compiles them in-process, so its cache is whole.
CACHE_PARALLEL = False
TOKEN_BLOCK_BYTES = 192 * 1024  # int16 activations per token block: stays in a core's L2 while rows stream
PANEL_MIN_TOKENS = 8  # from here on a panel's unpacking costs less than it saves (benchmarks/prefill_gemm.py)
PANEL_CHUNKS = 64  # at most: each allocates its panel once; several per thread even out slow cores


@njit(cache=True, fastmath=True)
def quantize_activations(isa, x, xq, xb, xd, xs):
    """x (K,) float32 -> x_hat[32b + j] = xq[32b + j] * xd[b] with xq int16 (|xq| <= ACTIVATION_MAX)
    and xs[b] = sum_j x_hat[32b + j]. The block sums are of x_hat, not x: then a q4 row's error is
    W . (x_hat - x), with no extra term from its uncentered nibbles. Where the ISA has byte dots,
    xb (2K,) holds xq again as bytes: for pair dots each full pair of blocks in isa_ops'
    PAIR_ORDER, the low bytes then the high bytes; for Arm's, each block's signed low and high
    bytes (SPLIT_BYTES)."""
    n_blocks = x.shape[0] // 32
    top = np.float32(ACTIVATION_MAX)
    for b in range(n_blocks):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[b * 32 + j]))
        inv = top / amax if amax > 0 else np.float32(0.0)
        total = 0
        for j in range(32):
            q = np.int16(round(x[b * 32 + j] * inv))
            xq[b * 32 + j] = q
            total += q
            if isa.pair_bytes and b < n_blocks - n_blocks % 2:
                at = pair_byte_index(b, j)
                xb[at] = np.uint8(q & 255)
                xb[at + PAIR_BYTES // 2] = np.uint8((q >> 8) & 255)
            if isa.split_bytes:
                low = ((np.int32(q) + 128) & 255) - 128
                at = split_byte_index(b, j)
                xb[at] = np.uint8(low & 255)
                xb[at + 32] = np.uint8(((np.int32(q) - low) >> 8) & 255)
        xd[b] = amax / top
        xs[b] = np.float32(total) * xd[b]


@njit(cache=CACHE_PARALLEL, parallel=True)
def _quantize_rows(isa, x, act):
    for t in prange(x.shape[0]):
        quantize_activations(isa, x[t], act.xq[t], act.xb[t], act.xd[t], act.xs[t])


@njit(cache=CACHE_PARALLEL, parallel=True)
def _matmul_panels(isa, w, act, out):
    """out[t, n] = W[n] . x_hat[t] for many tokens: each panel of rows is unpacked once
    (gemm_tile.repack_panel) into a buffer of its chunk, then every tile of tokens runs through it."""
    T, N = out.shape
    rows, tile = panel_shape(isa)
    n_blocks = w.qs.shape[1] // (16 if w.format != Q8_0 else 32)
    n_panels = (N + rows - 1) // rows
    chunks = min(n_panels, PANEL_CHUNKS)
    offsets = w.format == Q4_1 or w.format == Q5_1 or w.format == Q4_K or w.format == Q5_K
    for c in prange(chunks):
        wq = np.empty(n_blocks * PAIRS * rows * 2, np.int16)
        ws = np.empty(n_blocks * rows, np.float32)
        wo = np.empty(n_blocks * rows, np.float32)
        for g in range(c * n_panels // chunks, (c + 1) * n_panels // chunks):
            n0 = g * rows
            n_rows = min(rows, N - n0)
            repack_panel(isa, w, n0, n_rows, n_blocks, wq, ws, wo)
            for t0 in range(0, T, tile):
                panel_tile(isa, wq, ws, wo, offsets, act, n_blocks, t0, min(tile, T - t0), out, n0, n_rows)


@njit(cache=CACHE_PARALLEL, parallel=True)
def _matmul_row_tiles(isa, w, act, out):
    """out[t, n] = W[n] . x_hat[t] through the row dots, one weight row per task: in blocks of
    tokens whose activations fit in L2, in tiles of TILE_TOKENS that unpack each block of weights
    once, then single tokens. Per token the same sums as decode's, bit for bit."""
    T, N = out.shape
    K = w.qs.shape[1] * (1 if w.format == Q8_0 else 2)
    block = max(TILE_TOKENS, TOKEN_BLOCK_BYTES // (2 * K) // TILE_TOKENS * TILE_TOKENS)
    for t_start in range(0, T, block):
        t_stop = min(T, t_start + block)
        tiled = t_stop - (t_stop - t_start) % TILE_TOKENS
        for n in prange(N):
            for t in range(t_start, tiled, TILE_TOKENS):
                sums = tile_dot(isa, w, act, n, t)
                for i in range(TILE_TOKENS):
                    out[t + i, n] = sums[i]
            for t in range(tiled, t_stop):
                out[t, n] = row_dot(isa, w, act, n, t)


@njit(cache=CACHE_PARALLEL, parallel=True)
def _matmul_batch(isa, w, act, out):
    """out[t, n] = W[n] . x_hat[t] for a batch of decode steps (T tokens of T sequences): each
    weight row meets every token while it is in L1, its blocks unpacked once per tile of three
    tokens (or two: four tokens go 2 + 2). Three-token tiles run at 0.7 of three decode steps'
    cost where four-token ones (tile_dot, prefill's) spill registers on AVX-512 and run slower
    than three (benchmarks/batch_decode.py). Per token the sums of decode's row dot, bit for bit."""
    T, N = out.shape
    for n in prange(N):
        t = 0
        while t < T:
            left = T - t
            if left == 2 or left == 4:
                a, b = tile_dot2(isa, w, act, n, t)
                out[t, n], out[t + 1, n] = a, b
                t += 2
            elif left >= 3:
                a, b, c = tile_dot3(isa, w, act, n, t)
                out[t, n], out[t + 1, n], out[t + 2, n] = a, b, c
                t += 3
            else:
                out[t, n] = row_dot(isa, w, act, n, t)
                t += 1


@njit(cache=CACHE_PARALLEL, parallel=True)
def _matmul_quantized(isa, w, act, out, prompt):
    """out[t, n] = W[n] . x_hat[t]. A prompt step goes through the panels whatever its length, so
    each token's sums do not depend on how the prompt was split into steps (a prefix taken from
    another sequence's cache then equals a cold prefill bit for bit). Otherwise decode is nothing but
    the row dots, and steps of fewer than PANEL_MIN_TOKENS tokens (prompt-lookup's verify steps)
    take the row tiles, so their logits equal decode's; longer ones go through the panels."""
    T, N = out.shape
    if prompt or T >= PANEL_MIN_TOKENS:
        _matmul_panels(isa, w, act, out)
    elif T == 1:
        for n in prange(N):
            out[0, n] = row_dot(isa, w, act, n, 0)
    else:
        _matmul_row_tiles(isa, w, act, out)


@njit(cache=True, inline="always")
def _high_bit(qh, n, at, j):
    """Bit j of the little-endian uint32 at byte `at` of row n of a qh plane."""
    return (qh[n, at + j // 8] >> (j % 8)) & 1


@njit(cache=True)
def dequantize_row(w, n, row):
    """row[:] = W[n, :] as float32, bit for bit as gguf's dequantize computes it (no fastmath):
    the one block dequantizer of jitted code (embedding rows, float matmuls)."""
    K = row.shape[0]
    if w.format == F32:
        for k in range(K):
            row[k] = w.f32[n, k]
        return
    if w.format == F16:
        for k in range(K):
            row[k] = f16_to_f32(w.f16[n, k])
        return
    for b in range(K // 32):
        u = b // 8  # the super-block (K-quants)
        for j in range(32):
            if w.format == Q8_0:
                row[b * 32 + j] = np.float32(np.int8(w.qs[n, b * 32 + j])) * f16_to_f32(w.d[n, b])
                continue
            byte = w.qs[n, b * 16 + (j % 16)]
            q = np.int32(byte & 15) if j < 16 else np.int32(byte >> 4)
            if w.format == Q5_0 or w.format == Q5_1 or w.format == Q5_K:
                q |= np.int32(_high_bit(w.qh, n, 4 * b, j)) << 4
            elif w.format == Q6_K:
                q |= (np.int32(_high_bit(w.qh, n, 8 * b, j)) << 4) | (np.int32(_high_bit(w.qh, n, 8 * b + 4, j)) << 5)
            if w.format == Q4_0:
                v = np.float32(q - 8) * f16_to_f32(w.d[n, b])
            elif w.format == Q5_0:
                v = np.float32(q - 16) * f16_to_f32(w.d[n, b])
            elif w.format == Q4_1 or w.format == Q5_1:
                v = np.float32(q) * f16_to_f32(w.d[n, b]) + f16_to_f32(w.m[n, b])
            elif w.format == Q6_K:
                scale = f16_to_f32(w.d[n, u]) * np.float32(np.int8(w.sc[n, 2 * b + j // 16]))
                v = scale * np.float32(q - 32)
            else:  # q4_k, q5_k
                scale = f16_to_f32(w.d[n, u]) * np.float32(w.sc[n, 16 * u + b % 8])
                low = f16_to_f32(w.m[n, u]) * np.float32(w.sc[n, 16 * u + 8 + b % 8])
                v = scale * np.float32(q) - low
            row[b * 32 + j] = v


@njit(cache=CACHE_PARALLEL, parallel=True, fastmath=True)
def _matmul_float(w, x, out):
    """out (T, N) = x (T, K) @ W.T: each row of W is widened once, then used for all T tokens."""
    T, K = x.shape
    for n in prange(out.shape[1]):
        row = np.empty(K, np.float32)
        dequantize_row(w, n, row)
        for t in range(T):
            acc = np.float32(0.0)
            for k in range(K):
                acc += row[k] * x[t, k]
            out[t, n] = acc


@njit(cache=CACHE_PARALLEL, parallel=True, fastmath=True)
def _matvec_float(w, x, out):
    K = x.shape[0]
    for n in prange(out.shape[0]):
        acc = np.float32(0.0)
        if w.format == F32:
            for k in range(K):
                acc += w.f32[n, k] * x[k]
        else:
            for k in range(K):
                acc += f16_to_f32(w.f16[n, k]) * x[k]
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
def linear(isa, w, x, out, act, prompt):
    """out[t, n] = sum_k W[n, k] * x[t, k]   x (T, K) float32, out (T, N) float32; returns how many
    values of x are NaN or Inf. The kernels are fastmath, which assumes there are none and may
    turn them into zeros: a model whose activations overflow would answer garbage, not fail.
    act: records.activations(>= T, >= K), where quantized weights read x as int16 per block.
    prompt: a prompt step's sums, the same for a token whatever the step's length (see
    _matmul_quantized); else a decode or verify step's, equal to the row dots of decode."""
    T = x.shape[0]
    nonfinite = count_nonfinite(x)
    if w.format != F32 and w.format != F16:
        if T == 1:
            quantize_activations(isa, x[0], act.xq[0], act.xb[0], act.xd[0], act.xs[0])
        else:
            _quantize_rows(isa, x, act)
        _matmul_quantized(isa, w, act, out, prompt)
    elif T > 1 or prompt:
        _matmul_float(w, x, out)
    else:
        _matvec_float(w, x[0], out[0])
    return nonfinite


@njit(cache=True)
def linear_decode(isa, w, x, out, act):
    """linear() of one decode step for each of T sequences (forward_batch): every row of W is read
    once for all T tokens, and token t's sums equal its own decode step's bit for bit, at any T
    (the row dots and row tiles, never the panels)."""
    T = x.shape[0]
    if T == 1:
        return linear(isa, w, x, out, act, False)
    nonfinite = count_nonfinite(x)
    if w.format != F32 and w.format != F16:
        _quantize_rows(isa, x, act)
        _matmul_batch(isa, w, act, out)
    else:  # a float matrix-vector product per token: its sums in decode's order
        for t in range(T):
            _matvec_float(w, x[t], out[t])
    return nonfinite


@njit(cache=True)
def embed_rows(w, tokens, out):
    """out[t] = row tokens[t] of the embedding matrix, dequantized."""
    for t in range(tokens.shape[0]):
        dequantize_row(w, tokens[t], out[t])
