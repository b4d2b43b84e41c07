"""The int8 KV cache's writes: each block of KV_BLOCK values of a head's row rounded to int8 at a
float16 scale chosen for it. Whole blocks go through explicit vector IR: numba's own loops over
16 values stay scalar (the loop vectoriser wants longer trips, and numba leaves the SLP
vectoriser off), and were 5x slower."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .float16 import f16_to_f32, f32_to_f16
from .kv_cache import KV_BLOCK, KV_SCALE_TRIES
from .llvm_ir import F32, I8, I16, I32, I64, broadcast, call_intrinsic, lanes, vec

BLOCK_TYPE = vec(F32, KV_BLOCK)
ERROR_SUMS = 4  # each candidate's squared errors add up in 4 running sums: a chain of 16 adds would bind


def _rounded(builder, x, scale):
    """x times 1 / scale, clamped to -127..127 and rounded half to even (the default rounding mode),
    lane by lane (x, scale: float vectors of one width)."""
    t, n = x.type, x.type.count
    y = builder.fmul(x, builder.fdiv(ir.Constant(t, [1.0] * n), scale))
    low, high = ir.Constant(t, [-127.0] * n), ir.Constant(t, [127.0] * n)
    y = builder.select(builder.fcmp_ordered(">", y, low), y, low)  # as max(-127, y): NaN gives -127
    y = builder.select(builder.fcmp_ordered("<", y, high), y, high)
    return call_intrinsic(builder, f"llvm.rint.v{n}f32", t, [y])


def _block_at(context, builder, array_type, array, start, element):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [start]), vec(element, KV_BLOCK).as_pointer())


def _lanes_max(builder, v):
    """The largest lane of a float vector, passing over NaN (as Python's max(0.0, nan))."""
    return _lanes_fold(builder, v, "maxnum")


def _lanes_min(builder, v):
    return _lanes_fold(builder, v, "minnum")


def _lanes_fold(builder, v, op):
    n = v.type.count
    width = n
    while width > 1:  # by halving: lane i meets lane i + width
        width //= 2
        v = call_intrinsic(builder, f"llvm.{op}.v{n}f32", v.type,
                           [v, builder.shuffle_vector(v, v, lanes([(i + width) % n for i in range(n)]))])
    return builder.extract_element(v, ir.Constant(I32, 0))


@intrinsic
def block_scale(typingctx, values, start):
    """The float16 bits of the candidate scale (store_int8_heads) that rounds the KV_BLOCK values from
    values[start] (1-D contiguous float32) with the least squared error, the first on a tie. The
    candidates sit one per lane and the values go by one at a time."""
    def codegen(context, builder, signature, args):
        n = KV_SCALE_TRIES
        block = _block_at(context, builder, signature.args[0], args[0], args[1], F32)
        ptr = builder.bitcast(block, F32.as_pointer())
        magnitudes = call_intrinsic(builder, f"llvm.fabs.v{KV_BLOCK}f32", BLOCK_TYPE, [builder.load(block, align=4)])
        amax = _lanes_max(builder, magnitudes)
        steps = ir.Constant(vec(F32, n), [127.5 - 0.5 * c for c in range(n)])
        bits = builder.bitcast(builder.fptrunc(builder.fdiv(broadcast(builder, amax, n), steps),
                                               vec(ir.HalfType(), n)), vec(I16, n))
        scales = builder.fpext(builder.bitcast(bits, vec(ir.HalfType(), n)), vec(F32, n))
        sums = [ir.Constant(vec(F32, n), [0.0] * n)] * ERROR_SUMS
        for j in range(KV_BLOCK):
            x = broadcast(builder, builder.load(builder.gep(ptr, [ir.Constant(I64, j)])), n)
            d = builder.fsub(x, builder.fmul(_rounded(builder, x, scales), scales))
            sums[j % ERROR_SUMS] = builder.fadd(sums[j % ERROR_SUMS], builder.fmul(d, d))
        err = sums[0]
        for more in sums[1:]:
            err = builder.fadd(err, more)
        positive = builder.fcmp_ordered(">", scales, ir.Constant(vec(F32, n), [0.0] * n))
        err = builder.select(positive, err, ir.Constant(vec(F32, n), [float("inf")] * n))  # zero scales lose
        least = _lanes_min(builder, err)
        ties = builder.bitcast(builder.fcmp_ordered("==", err, broadcast(builder, least, n)), ir.IntType(n))
        first = call_intrinsic(builder, f"llvm.cttz.i{n}", ir.IntType(n), [ties, ir.Constant(ir.IntType(1), 0)])
        first = builder.select(builder.icmp_unsigned("<", first, ir.Constant(ir.IntType(n), n)), first,
                               ir.Constant(ir.IntType(n), 0))  # no lane compares (all NaN): the first
        return builder.extract_element(bits, builder.zext(first, I32))
    return types.uint16(values, types.intp), codegen


@intrinsic
def round_block(typingctx, values, start, scale, out, out_start):
    """out[out_start + j] = values[start + j] rounded at `scale` (> 0), j < KV_BLOCK (out: 1-D contiguous int8)."""
    def codegen(context, builder, signature, args):
        x = builder.load(_block_at(context, builder, signature.args[0], args[0], args[1], F32), align=4)
        q = builder.fptosi(_rounded(builder, x, broadcast(builder, args[2], KV_BLOCK)), vec(I8, KV_BLOCK))
        builder.store(q, _block_at(context, builder, signature.args[3], args[3], args[4], I8), align=1)
        return context.get_dummy_value()
    return types.void(values, types.intp, types.float32, out, types.intp), codegen


@njit(cache=True, inline="always")
def _round_int8(x):
    """x clamped to -127..127 and rounded half to even, as float32: the scalar twin of _rounded."""
    return np.float32(np.rint(min(np.float32(127.0), max(np.float32(-127.0), x))))


@njit(cache=True)
def store_int8_heads(values, start, n_heads, head_dim, out, scales):
    """Round n_heads head rows, values[start:start + n_heads * head_dim] (float32), into
    out[:n_heads * head_dim] (int8), a block of KV_BLOCK values of a head at a time, each at its
    own scale, whose float16 bits go to scales[h * ceil(head_dim / KV_BLOCK) + b].

    A block's scale is the one among KV_SCALE_TRIES candidates, its largest magnitude / 127.5 down
    to / 120 and each rounded to float16, that rounds the block with the least squared error. The
    largest magnitude alone sets the steps, but where each value falls between two multiples is
    luck, and 16 tries cut the rounding error by a sixth (llama.cpp's q8_0 takes max / 127). A
    block of zeros, or one too small for a float16 scale (below 1e-5), gets scale 0 and zeros."""
    per_head = (head_dim + KV_BLOCK - 1) // KV_BLOCK
    whole = head_dim // KV_BLOCK
    for h in range(n_heads):
        for b in range(whole):
            j = h * head_dim + b * KV_BLOCK
            bits = block_scale(values, start + j)
            scale = f16_to_f32(bits)
            if scale > 0:
                round_block(values, start + j, scale, out, j)
            else:
                out[j:j + KV_BLOCK] = 0
            scales[h * per_head + b] = bits
        if whole < per_head:  # the short last block of a head dim that is not a multiple of KV_BLOCK
            j = h * head_dim + whole * KV_BLOCK
            scales[h * per_head + whole] = _short_block(values, start + j, head_dim - whole * KV_BLOCK, out, j)


@njit(cache=True)
def _short_block(values, start, count, out, out_start):
    """store_int8_heads for a block of count < KV_BLOCK values, in scalar code; returns the scale's bits."""
    amax = np.float32(0.0)
    for j in range(start, start + count):
        amax = max(amax, abs(values[j]))
    best_bits = f32_to_f16(amax / np.float32(127.5))
    best_err = np.float32(np.inf)
    for c in range(KV_SCALE_TRIES):
        bits = f32_to_f16(amax / (np.float32(127.5) - np.float32(0.5) * np.float32(c)))
        scale = f16_to_f32(bits)
        if not scale > 0:
            continue
        inv = np.float32(1.0) / scale
        err = np.float32(0.0)
        for j in range(start, start + count):
            d = values[j] - _round_int8(values[j] * inv) * scale
            err += d * d
        if err < best_err:
            best_err, best_bits = err, bits
    scale = f16_to_f32(best_bits)
    inv = np.float32(1.0) / scale if scale > 0 else np.float32(0.0)
    for j in range(count):
        out[out_start + j] = np.int8(_round_int8(values[start + j] * inv))
    return best_bits
