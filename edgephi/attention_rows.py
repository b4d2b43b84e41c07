"""Attention's two row kernels over a KV cache head, as explicit-vector LLVM IR: q . k for every
cached row, and the weighted sum of value rows. Both read float32 or float16-bits caches, keep
their 32 columns in registers across all rows, and prefetch rows ahead.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .kv_cache import KV_BLOCK
from .llvm_ir import (
    F32,
    FAST,
    I8,
    LANES,
    broadcast,
    const,
    counted_loop,
    lanes,
    lanes_at,
    load_vector,
    prefetch,
    reduce_sum,
    splat,
    vec,
)

PREFETCH_ROWS = 16  # KV cache rows ahead that attention asks for
ROWS_CHUNK = 32  # columns weighted_rows_sum handles per call: four 8-lane accumulators
CHUNK_BLOCKS = ROWS_CHUNK // KV_BLOCK  # an int8 cache's scale blocks in a chunk


def _element(dtype) -> str:
    """How a KV cache's elements are stored: "f16" (float16 bits), "i8" or "f32"."""
    return {types.uint16: "f16", types.int8: "i8"}.get(dtype, "f32")


def _row_chunk_reader(builder, rows, col, kind):
    """read(s): row s, columns col .. col + ROWS_CHUNK - 1 of a 2-D C-contiguous array `rows` (a
    numba array struct) of float32, float16 bits or int8 (as integers, unscaled), as ROWS_CHUNK / 8
    float vectors of 8 lanes. Asking for row s also prefetches the same columns PREFETCH_ROWS rows
    on: the rows of a KV cache head are strided, which the hardware prefetchers follow only within
    a page."""
    itemsize = {"f16": 2, "i8": 1, "f32": 4}[kind]
    row_bytes = builder.extract_value(rows.strides, 0)
    base = builder.bitcast(rows.data, I8.as_pointer())
    col_bytes = builder.mul(col, const(itemsize))

    def read(s):
        start = builder.add(builder.mul(s, row_bytes), col_bytes)
        prefetch(builder, base, builder.add(start, builder.mul(row_bytes, const(PREFETCH_ROWS))), 0)
        at = [builder.add(start, const(g * LANES * itemsize)) for g in range(ROWS_CHUNK // LANES)]
        if kind == "i8":
            return [builder.sitofp(load_vector(builder, base, a, I8, LANES, 1), vec(F32, LANES)) for a in at]
        return [lanes_at(builder, base, a, kind == "f16") for a in at]
    return read


def _row_scales(builder, scales, s, scale_col):
    """scales[s, scale_col + b], b < CHUNK_BLOCKS, as one float32 vector: an int8 cache's block
    scales for a chunk, stored as float16 bits (one load and one conversion)."""
    base = builder.bitcast(scales.data, I8.as_pointer())
    first = builder.add(builder.mul(s, builder.extract_value(scales.strides, 0)), builder.mul(scale_col, const(2)))
    return lanes_at(builder, base, first, True, CHUNK_BLOCKS)


def _lanes_of(builder, v, i):
    """Lane i of vector v, broadcast to LANES lanes."""
    return builder.shuffle_vector(v, v, lanes([i] * LANES))


def _block_sums(builder, blocks):
    """The lane sums of CHUNK_BLOCKS vectors of LANES floats, as one CHUNK_BLOCKS-lane vector: halving
    all of them at once, two by two, so it takes as many shuffles as one vector's sum."""
    while len(blocks) > 1 or blocks[0].type.count > CHUNK_BLOCKS:
        n = blocks[0].type.count
        if len(blocks) > 1:  # pair them: the low halves of both, then the high halves
            pairs = []
            for a, b in zip(blocks[::2], blocks[1::2]):
                low = builder.shuffle_vector(a, b, lanes(list(range(n // 2)) + list(range(n, n + n // 2))))
                high = builder.shuffle_vector(a, b, lanes(list(range(n // 2, n)) + list(range(n + n // 2, 2 * n))))
                pairs.append(builder.fadd(low, high, flags=FAST))
            blocks = pairs
        else:  # one vector of CHUNK_BLOCKS runs: add its runs' halves
            v, run = blocks[0], n // CHUNK_BLOCKS
            order = [r * run + i for r in range(CHUNK_BLOCKS) for i in range(run // 2)]
            later = [r * run + run // 2 + i for r in range(CHUNK_BLOCKS) for i in range(run // 2)]
            first, second = builder.shuffle_vector(v, v, lanes(order)), builder.shuffle_vector(v, v, lanes(later))
            blocks = [builder.fadd(first, second, flags=FAST)]
    return blocks[0]


def _block_of(g: int) -> int:
    """Which of a chunk's scale blocks its g-th group of LANES columns lies in."""
    return g * LANES // KV_BLOCK


@intrinsic
def weighted_rows_sum(typingctx, weights, n_rows, rows, col, scales, scale_col, out, out_col):
    """out[out_col + i] = sum_{s < n_rows, weights[s] != 0} weights[s] * rows[s, col + i], i < 32.
    rows: a 2-D C-contiguous float32, float16-bits (uint16) or int8 array (attention's V cache);
    int8 rows' blocks of KV_BLOCK columns are multiplied by scales[s, scale_col + b] (float16 bits
    (C, blocks)). The 32 sums stay in registers across all rows, where a loop of slice updates
    stores them every row."""
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
            if kind == "i8":  # the weight times each block's scale
                scaled = builder.fmul(broadcast(builder, w, CHUNK_BLOCKS), _row_scales(builder, sa, s, scale_col),
                                      flags=FAST)
                wv = [_lanes_of(builder, scaled, b) for b in range(CHUNK_BLOCKS)]
            else:
                wv = [broadcast(builder, w, LANES)]
            updated = [builder.fadd(a, builder.fmul(wv[_block_of(g) % len(wv)], vals, flags=FAST), flags=FAST)
                       for g, (a, vals) in enumerate(zip(accs, row_lanes(s)))]
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
    q . k over 32 columns of the K cache (float32, float16 bits, or int8 whose blocks of KV_BLOCK
    columns are times the float16 bits scales[s, scale_col + b]), q held in registers."""
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
            # products summed per scale block (an int8 cache's), or all in one
            blocks = [None] * (CHUNK_BLOCKS if kind == "i8" else 1)
            for g, (q_lanes, vals) in enumerate(zip(qv, row_lanes(s))):
                prod = builder.fmul(q_lanes, vals, flags=FAST)
                b = _block_of(g) if kind == "i8" else 0
                blocks[b] = prod if blocks[b] is None else builder.fadd(blocks[b], prod, flags=FAST)
            if kind == "i8":  # each block's sum times its scale
                scales = _row_scales(builder, sa, s, scale_col)
                dot = reduce_sum(builder, builder.fmul(_block_sums(builder, blocks), scales, flags=FAST))
            else:
                dot = reduce_sum(builder, blocks[0])
            op = builder.gep(obase, [s])
            previous = builder.select(accumulate, builder.load(op), ir.Constant(F32, 0.0))
            builder.store(builder.fadd(previous, dot, flags=FAST), op)
            return []

        counted_loop(builder, n_rows, [], row, "rdc")
        return context.get_dummy_value()

    return sig, codegen
