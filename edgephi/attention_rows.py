"""Attention's two row kernels over a KV cache head, as explicit-vector LLVM IR: q . k for every
cached row, and the weighted sum of value rows. Both read float32 or float16-bits caches, keep
their 32 columns in registers across all rows, and prefetch rows ahead.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .llvm_ir import (
    F32,
    FAST,
    I8,
    LANES,
    broadcast,
    const,
    counted_loop,
    lanes_at,
    load_vector,
    prefetch,
    reduce_sum,
    splat,
    vec,
)

PREFETCH_ROWS = 16  # KV cache rows ahead that attention asks for
ROWS_CHUNK = 32  # columns weighted_rows_sum handles per call: four 8-lane accumulators


def _element(dtype) -> str:
    """How a KV cache's elements are stored: "f16" (float16 bits), "i8" or "f32"."""
    return {types.uint16: "f16", types.int8: "i8"}.get(dtype, "f32")


def _row_chunk_reader(builder, rows, col, kind):
    """lanes(s): row s, columns col .. col + ROWS_CHUNK - 1 of a 2-D C-contiguous array `rows` (a
    numba array struct) of float32, float16 bits or int8 (as integers, unscaled), as ROWS_CHUNK / 8
    float vectors of 8 lanes. Asking for row s also prefetches the same columns PREFETCH_ROWS rows
    on: the rows of a KV cache head are strided, which the hardware prefetchers follow only within
    a page."""
    itemsize = {"f16": 2, "i8": 1, "f32": 4}[kind]
    row_bytes = builder.extract_value(rows.strides, 0)
    base = builder.bitcast(rows.data, I8.as_pointer())
    col_bytes = builder.mul(col, const(itemsize))

    def lanes(s):
        start = builder.add(builder.mul(s, row_bytes), col_bytes)
        prefetch(builder, base, builder.add(start, builder.mul(row_bytes, const(PREFETCH_ROWS))), 0)
        at = [builder.add(start, const(g * LANES * itemsize)) for g in range(ROWS_CHUNK // LANES)]
        if kind == "i8":
            return [builder.sitofp(load_vector(builder, base, a, I8, LANES, 1), vec(F32, LANES)) for a in at]
        return [lanes_at(builder, base, a, kind == "f16") for a in at]
    return lanes


def _row_scale(builder, scales, s, scale_col):
    """scales[s, scale_col] (float32; an int8 cache's block scale)."""
    base = builder.bitcast(scales.data, I8.as_pointer())
    at = builder.add(builder.mul(s, builder.extract_value(scales.strides, 0)), builder.mul(scale_col, const(4)))
    return builder.load(builder.bitcast(builder.gep(base, [at]), F32.as_pointer()))


@intrinsic
def weighted_rows_sum(typingctx, weights, n_rows, rows, col, scales, scale_col, out, out_col):
    """out[out_col + i] = sum_{s < n_rows, weights[s] != 0} weights[s] * rows[s, col + i], i < 32.
    rows: a 2-D C-contiguous float32, float16-bits (uint16) or int8 array (attention's V cache);
    int8 rows are multiplied by scales[s, scale_col] (float32 (C, blocks)). The 32 sums stay in
    registers across all rows, where a loop of slice updates stores them every row."""
    sig = types.void(weights, types.intp, rows, types.intp, scales, types.intp, out, types.intp)
    kind = _element(rows.dtype)

    def codegen(context, builder, signature, args):
        wa = context.make_array(signature.args[0])(context, builder, args[0])
        ra = context.make_array(signature.args[2])(context, builder, args[2])
        sa = context.make_array(signature.args[4])(context, builder, args[4])
        oa = context.make_array(signature.args[6])(context, builder, args[6])
        n_rows, col, scale_col, out_col = args[1], args[3], args[5], args[7]
        wbase = builder.bitcast(wa.data, F32.as_pointer())
        obase = builder.bitcast(oa.data, F32.as_pointer())
        row_lanes = _row_chunk_reader(builder, ra, col, kind)

        def row(s, accs):
            w = builder.load(builder.gep(wbase, [s]))
            use = builder.append_basic_block("wrs.use")
            merge = builder.append_basic_block("wrs.merge")
            skipped_from = builder.block
            builder.cbranch(builder.fcmp_ordered("!=", w, ir.Constant(F32, 0.0)), use, merge)
            builder.position_at_end(use)
            if kind == "i8":
                w = builder.fmul(w, _row_scale(builder, sa, s, scale_col), flags=FAST)
            wv = broadcast(builder, w, LANES)
            updated = [builder.fadd(a, builder.fmul(wv, vals, flags=FAST), flags=FAST)
                       for a, vals in zip(accs, row_lanes(s))]
            used_from = builder.block
            builder.branch(merge)
            builder.position_at_end(merge)
            merged = []
            for a, new in zip(accs, updated):  # a row with weight 0 leaves the sums as they were
                phi = builder.phi(vec(F32, LANES))
                phi.add_incoming(a, skipped_from)
                phi.add_incoming(new, used_from)
                merged.append(phi)
            return merged

        accs = counted_loop(builder, n_rows, [splat(F32, LANES, 0.0)] * (ROWS_CHUNK // LANES), row, "wrs")
        for g, a in enumerate(accs):
            p = builder.gep(obase, [builder.add(out_col, const(g * LANES))])
            builder.store(a, builder.bitcast(p, vec(F32, LANES).as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def rows_dot_chunk(typingctx, q, q_col, n_rows, rows, col, scales, scale_col, out, accumulate):
    """out[s] (+)= sum_{i < 32} q[q_col + i] * rows[s, col + i] for every s < n_rows: attention's
    q . k over 32 columns of the K cache (float32, float16 bits, or int8 times scales[s,
    scale_col]), q held in registers."""
    sig = types.void(q, types.intp, types.intp, rows, types.intp, scales, types.intp, out, types.boolean)
    kind = _element(rows.dtype)

    def codegen(context, builder, signature, args):
        qa = context.make_array(signature.args[0])(context, builder, args[0])
        ra = context.make_array(signature.args[3])(context, builder, args[3])
        sa = context.make_array(signature.args[5])(context, builder, args[5])
        oa = context.make_array(signature.args[7])(context, builder, args[7])
        q_col, n_rows, col, scale_col, accumulate = args[1], args[2], args[4], args[6], args[8]
        qbase = builder.bitcast(qa.data, F32.as_pointer())
        obase = builder.bitcast(oa.data, F32.as_pointer())
        row_lanes = _row_chunk_reader(builder, ra, col, kind)
        qv = []
        for g in range(ROWS_CHUNK // LANES):
            p = builder.gep(qbase, [builder.add(q_col, const(g * LANES))])
            qv.append(builder.load(builder.bitcast(p, vec(F32, LANES).as_pointer()), align=4))

        def row(s, _):
            acc = None
            for q_lanes, vals in zip(qv, row_lanes(s)):
                prod = builder.fmul(q_lanes, vals, flags=FAST)
                acc = prod if acc is None else builder.fadd(acc, prod, flags=FAST)
            op = builder.gep(obase, [s])
            previous = builder.select(accumulate, builder.load(op), ir.Constant(F32, 0.0))
            dot = reduce_sum(builder, acc)
            if kind == "i8":
                dot = builder.fmul(dot, _row_scale(builder, sa, s, scale_col), flags=FAST)
            builder.store(builder.fadd(previous, dot, flags=FAST), op)
            return []

        counted_loop(builder, n_rows, [], row, "rdc")
        return context.get_dummy_value()

    return sig, codegen
