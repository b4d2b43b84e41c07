"""The transformer's other kernels in jitted code, over plain arrays: RMSNorm, rotary embedding,
the KV cache write, attention, SwiGLU and the residual add (linear layers are in matmul.py).
Each has a numpy twin in tests/test_kernels.py.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, register_jitable

from .attention_lanes import LANE_ROWS, LANE_TOKENS, lane_products, prefetch_row
from .attention_rows import ROWS_CHUNK, rows_dot_chunk, weighted_rows_sum
from .float16 import f16_to_f32, narrow, widen
from .kv_cache import KV_BLOCK
from .kv_int8 import store_int8_heads
from .llvm_ir import call_intrinsic
from .matmul import CACHE_PARALLEL


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


@njit(cache=True)
def store_kv(qkv, slots, k_cache, v_cache, k_scale, v_scale, n_heads, n_kv_heads, head_dim):
    """Write the new tokens' k and v into cache slots. k_cache (C, Hk * Dh) f16 bits, float32, or
    int8: then each block of KV_BLOCK values of a head's row (the last may be shorter) is rounded
    at its own scale (kv_int8.store_int8_heads), whose float16 bits go to k_scale (C, Hk *
    ceil(Dh / KV_BLOCK)) (float caches pass scales of shape (C, 0))."""
    q_width = n_heads * head_dim
    kv_width = n_kv_heads * head_dim
    quantized = k_scale.shape[1] > 0
    for t in range(qkv.shape[0]):
        s = slots[t]
        if quantized:
            store_int8_heads(qkv[t], q_width, n_kv_heads, head_dim, k_cache[s], k_scale[s])
            store_int8_heads(qkv[t], q_width + kv_width, n_kv_heads, head_dim, v_cache[s], v_scale[s])
        else:
            for j in range(kv_width):
                k_cache[s, j] = narrow(qkv[t, q_width + j], k_cache)
                v_cache[s, j] = narrow(qkv[t, q_width + kv_width + j], v_cache)


@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _floor(typingctx, x):
    """floor of a float32 as LLVM's own intrinsic: numba's math.floor calls libm's floorf, and a
    loop with a call in it does not vectorise."""
    def codegen(context, builder, signature, args):
        return call_intrinsic(builder, "llvm.floor.f32", ir.FloatType(), [args[0]])
    return types.float32(types.float32), codegen


@njit(cache=True, fastmath=True, inline="always")
def exp_nonpositive(x):
    """exp(x) for x <= 0 in plain arithmetic (Cephes' expf polynomial, < 2 ulp), so that a loop
    of them vectorises; libm's exp is one call per value. Below -87 (and for -inf) it is 0."""
    n = _floor(x * np.float32(1.44269504) + np.float32(0.5))
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


@njit(cache=True, inline="always")
def _slots_in_order(slot_pos, n_slots):
    """Whether the used slots hold increasing positions, as until the ring wraps: the slots a token
    may see are then a prefix, and a prefill token stops there instead of scoring the later ones
    only to mask them."""
    if n_slots == 0 or slot_pos[0] < 0:
        return False
    for s in range(1, n_slots):
        if slot_pos[s] <= slot_pos[s - 1]:
            return False
    return True


@njit(cache=CACHE_PARALLEL, parallel=True, fastmath=True)
def attention(qkv, positions, k_cache, v_cache, k_scale, v_scale, slot_pos, n_slots, window, n_heads, n_kv_heads,
              head_dim, scores, out):
    """Causal attention of each new token over the cache slots holding earlier-or-equal positions
    (and, with a sliding window > 0, positions > pos - window), one (token, head) per task.
    scores (T * H, C) scratch; out (T, H * Dh). An int8 cache's rows are read as integers, each
    block's dot (or weight) multiplied by its scale (k_scale, v_scale, see store_kv): the
    dequantized cache's attention, up to float rounding. Rows are taken as slices: LLVM vectorises the
    dot and axpy loops over them (with float16 widened by vcvtph2ps), unlike 2-D indexing here."""
    T = qkv.shape[0]
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    ordered = _slots_in_order(slot_pos, n_slots)
    quantized = k_scale.shape[1] > 0
    per_head = (head_dim + KV_BLOCK - 1) // KV_BLOCK
    for th in prange(T * n_heads):
        t = th // n_heads
        h = th % n_heads
        pos = positions[t]
        q = qkv[t, h * head_dim:(h + 1) * head_dim]
        kh = h // group
        kv = kh * head_dim
        row = scores[th]
        n = np.searchsorted(slot_pos[:n_slots], pos, side="right") if ordered else n_slots
        chunked = head_dim - head_dim % ROWS_CHUNK
        for c in range(0, chunked, ROWS_CHUNK):
            rows_dot_chunk(qkv[t], h * head_dim + c, n, k_cache, kv + c, k_scale, kh * per_head + c // KV_BLOCK, row,
                           c > 0)
        best = np.float32(-np.inf)
        for s in range(n):
            p = slot_pos[s]
            if p < 0 or p > pos or (window > 0 and p <= pos - window):
                row[s] = -np.inf
            else:
                if chunked < head_dim:
                    partial = row[s] if chunked > 0 else np.float32(0.0)
                    if quantized:
                        for b0 in range(chunked, head_dim, KV_BLOCK):
                            b1 = min(b0 + KV_BLOCK, head_dim)
                            partial += _dot(q[b0:b1], k_cache[s, kv + b0:kv + b1]) * \
                                f16_to_f32(k_scale[s, kh * per_head + b0 // KV_BLOCK])
                        row[s] = partial
                    else:
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
            weighted_rows_sum(row, n, v_cache, kv + c, v_scale, kh * per_head + c // KV_BLOCK, out[t], o0 + c)
        if chunked < head_dim:  # head dims that are not a multiple of 32 (small test models)
            o = out[t, o0 + chunked:o0 + head_dim]
            o[:] = 0.0
            for s in range(n):
                if row[s] != 0.0:
                    if quantized:
                        for b0 in range(chunked, head_dim, KV_BLOCK):
                            b1 = min(b0 + KV_BLOCK, head_dim)
                            w = row[s] * f16_to_f32(v_scale[s, kh * per_head + b0 // KV_BLOCK])
                            _axpy(w, v_cache[s, kv + b0:kv + b1], o[b0 - chunked:b1 - chunked])
                    else:
                        _axpy(row[s], v_cache[s, kv + chunked:kv + head_dim], o)


@register_jitable  # plain Python when new_scratch calls it: a jitted call from Python would load
def lane_scratch_floats(head_dim):  # another compiled library, 8 MB of resident memory
    """Floats of attention_prompt's scratch per head: q and the output transposed (Dh, LANE_TOKENS),
    a tile of LANE_ROWS widened cache rows, and the softmax's running max and sum per lane."""
    return 2 * LANE_TOKENS * head_dim + LANE_ROWS * head_dim + 2 * LANE_TOKENS


@njit(cache=True, inline="always")
def _widen_rows(cache, scales, s0, rows, col, width, block0, tile):
    """tile[r * width + j] = cache[s0 + r, col + j] as float32 (an int8 cache's times its block scale,
    the float16 bits scales[s0 + r, block0 + j // KV_BLOCK]): the values the dequantized cache holds."""
    quantized = scales.shape[1] > 0
    for r in range(rows):
        if s0 + r + LANE_ROWS < cache.shape[0]:  # the next tile's row
            prefetch_row(cache, s0 + r + LANE_ROWS, col, width)
        src = cache[s0 + r, col:col + width]
        dst = tile[r * width:(r + 1) * width]
        if quantized:
            for b0 in range(0, width, KV_BLOCK):
                scale = f16_to_f32(scales[s0 + r, block0 + b0 // KV_BLOCK])
                for j in range(b0, min(width, b0 + KV_BLOCK)):
                    dst[j] = widen(src[j]) * scale
        else:
            for j in range(width):
                dst[j] = widen(src[j])


# Sums must not be reordered: a token's values have to be the same whichever tokens share its call
@njit(cache=CACHE_PARALLEL, parallel=True, fastmath={"contract", "nsz", "arcp", "afn"})
def attention_prompt(qkv, positions, k_cache, v_cache, k_scale, v_scale, slot_pos, n_slots, window, n_heads,
                     n_kv_heads, head_dim, scores, lanes, out):
    """attention() for a prompt step of T <= LANE_TOKENS tokens at increasing positions, one head per
    task and one token per float lane (attention_lanes.py): each cached row is widened once for all
    the tokens. Every token's scores, softmax and weighted sum run over the rows in slot order, so a
    token's output does not depend on which tokens share its call (lanes past T repeat the last
    token). scores (LANE_TOKENS * H, C) scratch; lanes (H, lane_scratch_floats(Dh)) scratch."""
    T, L, Dh = qkv.shape[0], LANE_TOKENS, head_dim
    if T > L or scores.shape[0] < L * n_heads or lanes.shape[0] < n_heads or lanes.shape[1] < lane_scratch_floats(Dh):
        raise ValueError("attention_prompt: the step's tokens exceed its scratch")
    group = n_heads // n_kv_heads
    scale = np.float32(1.0 / math.sqrt(head_dim))
    ordered = _slots_in_order(slot_pos, n_slots)
    lane_pos = np.empty(L, np.int64)
    for lane in range(L):
        lane_pos[lane] = positions[min(lane, T - 1)]
    n = np.searchsorted(slot_pos[:n_slots], lane_pos[L - 1], side="right") if ordered else n_slots
    C = scores.shape[1]
    per_head = (head_dim + KV_BLOCK - 1) // KV_BLOCK
    for h in prange(n_heads):
        kh = h // group
        buf = lanes[h]
        q_t, out_t = buf[:Dh * L], buf[Dh * L:2 * Dh * L]  # (Dh, L): dim-major, a lane per token
        tile = buf[2 * Dh * L:2 * Dh * L + LANE_ROWS * Dh]  # (LANE_ROWS, Dh) widened cache rows
        best, total = buf[(2 * L + LANE_ROWS) * Dh:(2 * L + LANE_ROWS) * Dh + L], buf[(2 * L + LANE_ROWS) * Dh + L:]
        weights = scores[h * L:(h + 1) * L].reshape(L * C)  # (C, L): row s holds every token's weight of slot s
        for d in range(Dh):
            for lane in range(L):
                q_t[d * L + lane] = qkv[min(lane, T - 1), h * Dh + d]
        for s0 in range(0, n, LANE_ROWS):
            rows = min(LANE_ROWS, n - s0)
            _widen_rows(k_cache, k_scale, s0, rows, kh * Dh, Dh, kh * per_head, tile)
            # weights[s, :] = K[s] . q for this tile's rows s
            lane_products(tile, 0, Dh, 1, rows, Dh, q_t, 0, weights[s0 * L:], False)
        best[:] = -np.inf
        for s in range(n):
            p = slot_pos[s]
            row = weights[s * L:(s + 1) * L]
            for lane in range(L):
                seen = (p >= 0) & (p <= lane_pos[lane]) & ((window <= 0) | (p > lane_pos[lane] - window))
                value = row[lane] * scale if seen else np.float32(-np.inf)
                row[lane] = value
                best[lane] = max(best[lane], value)
        total[:] = 0.0
        for s in range(n):
            row = weights[s * L:(s + 1) * L]
            for lane in range(L):
                e = exp_nonpositive(row[lane] - best[lane])
                row[lane] = e
                total[lane] += e
        out_t[:] = 0.0
        for s0 in range(0, n, LANE_ROWS):
            rows = min(LANE_ROWS, n - s0)
            _widen_rows(v_cache, v_scale, s0, rows, kh * Dh, Dh, kh * per_head, tile)
            # out_t[d, :] += sum_s V[s, d] * weights[s, :] over this tile's rows s
            lane_products(tile, 0, 1, Dh, Dh, rows, weights, s0, out_t, True)
        for t in range(T):  # the weights were left unnormalised: one division per output, not per weight
            inv = np.float32(1.0) / total[t]
            for d in range(Dh):
                out[t, h * Dh + d] = out_t[d * L + t] * inv


@njit(cache=True, fastmath=True, error_model="numpy")
def silu_mul(gate_up, out):
    """out = silu(gate) * up, with gate the first F columns of gate_up (T, 2F) and up the rest.
    sigmoid(g) from e = exp(-|g|): 1 / (1 + e), or e / (1 + e) below 0, in plain arithmetic that
    vectorises (a libm exp per value was 4% of a Phi-3-mini prefill; numpy's error model drops
    the zero-division check, whose branch would keep the loop scalar: 1 + e is never 0)."""
    F = out.shape[1]
    for t in range(out.shape[0]):
        gate, up, act = gate_up[t, :F], gate_up[t, F:], out[t]
        for k in range(F):
            g = gate[k]
            e = exp_nonpositive(-abs(g))
            act[k] = g * max(e, np.float32(g >= 0)) / (np.float32(1.0) + e) * up[k]  # max: 1 from 0 on, else e


@njit(cache=True)
def add_into(x, y):
    for t in range(x.shape[0]):
        for k in range(x.shape[1]):
            x[t, k] += y[t, k]


@njit(cache=True, parallel=True)
def copy_first_rows(source, target, n):
    """target[l, :n] = source[l, :n] for every layer l (3-D arrays of one dtype), the layers shared
    among the threads. Copying a prefix into a new ring is mostly the kernel mapping its pages,
    and the threads map them side by side: the numba workers, still spinning after the last step,
    would otherwise only take the core from the copy (a 1,000-token Phi-3-mini prefix, 400 MB:
    0.6 s by one thread just after a reply, 0.12 s with the workers asleep)."""
    for layer in prange(source.shape[0]):
        target[layer, :n] = source[layer, :n]
