"""Explicit-vector block dot products for the decode matrix-vector kernels, written as LLVM IR.

numba's own loops over these blocks reach only a third of what the core can do: its integer
promotion rules widen nibbles to int64, and LLVM's vectoriser then reduces every 32-value block
to a scalar. Here each block is one vector expression: 32 weights (nibbles or int8) widened to
int16, multiplied with the activations quantized to int16 per block of 32, summed in pairs to
int32 (x86's vpmaddwd where the CPU has AVX2; the same arithmetic in plain IR elsewhere), then
scaled and accumulated in an 8-lane float vector that is reduced once per row.

Exactness: the integer dot is exact (|q| <= 128, |x| <= 32767, 32 terms fit int32); the only
rounding beyond float32 arithmetic is the activations' int16 quantization, an error of at most
2^-16 of each block's largest value per element.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import config
from numba.extending import intrinsic

F32 = ir.FloatType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
FAST = ("fast",)
LANES = 8  # float accumulator width: one AVX register


def _target_has_avx2() -> bool:
    """Whether the CPU numba compiles for has AVX2 (NUMBA_CPU_NAME/FEATURES override the host)."""
    if config.CPU_NAME:
        return "+avx2" in (config.CPU_FEATURES or "")
    return bool(llvm.get_host_cpu_features().get("avx2", False))


USE_AVX2 = _target_has_avx2()


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat_const(t, n, value):
    return ir.Constant(_vec(t, n), [value] * n)


def _lanes(values):
    return ir.Constant(_vec(I32, len(values)), list(values))


def _pmaddwd(builder, a, b):
    """<16 x i16> a, b -> <8 x i32>: a[2i]*b[2i] + a[2i+1]*b[2i+1]."""
    if USE_AVX2:
        fnty = ir.FunctionType(_vec(I32, 8), [_vec(I16, 16), _vec(I16, 16)])
        name = "llvm.x86.avx2.pmadd.wd"
        fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)
        return builder.call(fn, [a, b])
    even, odd = _lanes(range(0, 16, 2)), _lanes(range(1, 16, 2))

    def wide(v, sel):
        return builder.sext(builder.shuffle_vector(v, v, sel), _vec(I32, 8))
    return builder.add(builder.mul(wide(a, even), wide(b, even)), builder.mul(wide(a, odd), wide(b, odd)))


def _halves(builder, v):
    lo, hi = _lanes(range(16)), _lanes(range(16, 32))
    return builder.shuffle_vector(v, v, lo), builder.shuffle_vector(v, v, hi)


def _f16_at(builder, base, byte_offset):
    bits = builder.load(builder.bitcast(builder.gep(base, [byte_offset]), I16.as_pointer()), align=2)
    return builder.fpext(builder.bitcast(bits, ir.HalfType()), F32)


def _broadcast(builder, value, n):
    undef = ir.Constant(_vec(value.type, n), ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, undef, _lanes([0] * n))


def _reduce(builder, v):
    """Sum of an 8-lane float vector."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(builder.shuffle_vector(v, v, _lanes(range(n))),
                         builder.shuffle_vector(v, v, _lanes(range(n, 2 * n))), flags=FAST)
    return builder.extract_element(v, ir.Constant(I32, 0))


def _counted_loop(builder, count, initial, body, name):
    """Emit `for i in range(count)` carrying the values `initial`: body(i, values) emits the loop
    body (it may add blocks) and returns the next values. Returns the values after the loop."""
    entry = builder.block
    head = builder.append_basic_block(f"{name}.head")
    loop = builder.append_basic_block(f"{name}.body")
    done = builder.append_basic_block(f"{name}.done")
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(I64)
    i.add_incoming(ir.Constant(I64, 0), entry)
    values = []
    for value in initial:
        phi = builder.phi(value.type)
        phi.add_incoming(value, entry)
        values.append(phi)
    builder.cbranch(builder.icmp_signed("<", i, count), loop, done)
    builder.position_at_end(loop)
    following = body(i, values)
    last = builder.block
    i.add_incoming(builder.add(i, ir.Constant(I64, 1)), last)
    for phi, value in zip(values, following):
        phi.add_incoming(value, last)
    builder.branch(head)
    builder.position_at_end(done)
    return values


def _token_rows(builder, array, t0, count, elem):
    """Pointers to rows t0 .. t0 + count - 1 of a 2-D array, typed elem*."""
    stride = builder.extract_value(array.strides, 0)
    base = builder.bitcast(array.data, I8.as_pointer())
    return [builder.bitcast(builder.gep(base, [builder.mul(builder.add(t0, ir.Constant(I64, i)), stride)]),
                            elem.as_pointer()) for i in range(count)]


def _lanes_at(builder, base, byte_offset, half):
    """8 float32 values at base + byte_offset, stored as float32 or as float16 bits."""
    p = builder.gep(base, [byte_offset])
    if half:
        bits = builder.load(builder.bitcast(p, _vec(I16, LANES).as_pointer()), align=2)
        return builder.fpext(builder.bitcast(bits, _vec(ir.HalfType(), LANES)), _vec(F32, LANES))
    return builder.load(builder.bitcast(p, _vec(F32, LANES).as_pointer()), align=4)


def _row_chunk_reader(builder, rows, col, half):
    """lanes(s): row s, columns col .. col + ROWS_CHUNK - 1 of a 2-D C-contiguous array `rows` (a
    numba array struct) of float32 or float16 bits, as ROWS_CHUNK / 8 float vectors of 8 lanes."""
    itemsize = 2 if half else 4
    row_bytes = builder.extract_value(rows.strides, 0)
    base = builder.bitcast(rows.data, I8.as_pointer())
    col_bytes = builder.mul(col, ir.Constant(I64, itemsize))

    def lanes(s):
        start = builder.add(builder.mul(s, row_bytes), col_bytes)
        return [_lanes_at(builder, base, builder.add(start, ir.Constant(I64, g * LANES * itemsize)), half)
                for g in range(ROWS_CHUNK // LANES)]
    return lanes


def _block_weights(builder, kind, qbase, row_offset, b):
    """The 32 weights of block b as <32 x i16>, in the order of the block's activations."""
    if kind == "q8_0":
        p = builder.gep(qbase, [builder.add(row_offset, builder.mul(b, ir.Constant(I64, 32)))])
        return builder.sext(builder.load(builder.bitcast(p, _vec(I8, 32).as_pointer()), align=1), _vec(I16, 32))
    p = builder.gep(qbase, [builder.add(row_offset, builder.mul(b, ir.Constant(I64, 16)))])
    packed = builder.load(builder.bitcast(p, _vec(I8, 16).as_pointer()), align=1)
    low = builder.and_(packed, _splat_const(I8, 16, 15))  # ggml order: low nibbles are values 0..15
    high = builder.lshr(packed, _splat_const(I8, 16, 4))  # high nibbles are values 16..31
    return builder.zext(builder.shuffle_vector(low, high, _lanes(range(32))), _vec(I16, 32))


def _make_row_dot(kind: str, tokens: int):
    """row_dot(qs, d, m, xq, xd, xs, n, t0): row n of a q4_0/q4_1/q8_0 matrix (planes qs, d, m as in
    kernels.py) dotted with tokens t0 .. t0 + tokens - 1 of activations quantized per block:
    x_hat[t, 32b + j] = xq[t, 32b + j] * xd[t, b], xs[t, b] = sum of the block's x_hat (for q4_1's
    minimum and q4_0's -8). Returns a float32, or a tuple of them for tiles of several tokens,
    which unpack each block of weights once for all of them (prefill)."""

    @intrinsic
    def row_dot(typingctx, qs, d, m, xq, xd, xs, n, t0):
        result = types.float32 if tokens == 1 else types.UniTuple(types.float32, tokens)
        sig = result(qs, d, m, xq, xd, xs, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            qa, da, ma, xqa, xda, xsa = (context.make_array(t)(context, builder, a)
                                         for t, a in zip(signature.args[:6], args[:6]))
            n_blocks = builder.extract_value(da.shape, 1)
            row, t0 = args[6], args[7]
            q_row = builder.mul(row, builder.extract_value(qa.strides, 0))
            s_row = builder.mul(row, builder.extract_value(da.strides, 0))
            qbase = builder.bitcast(qa.data, I8.as_pointer())
            dbase = builder.bitcast(da.data, I8.as_pointer())
            mbase = builder.bitcast(ma.data, I8.as_pointer())
            xq_rows, xd_rows, xs_rows = (_token_rows(builder, a, t0, tokens, elem)
                                         for a, elem in ((xqa, I16), (xda, F32), (xsa, F32)))

            def block(b, carried):
                accs, offsets = carried[:tokens], carried[tokens:]
                w_lo, w_hi = _halves(builder, _block_weights(builder, kind, qbase, q_row, b))
                s_off = builder.add(s_row, builder.mul(b, ir.Constant(I64, 2)))
                d_w = _f16_at(builder, dbase, s_off)
                if kind == "q4_1":
                    low = _f16_at(builder, mbase, s_off)
                elif kind == "q4_0":
                    low = builder.fmul(d_w, ir.Constant(F32, -8.0))  # values are q - 8
                new_accs, new_offsets = [], []
                for i in range(tokens):
                    xp = builder.gep(xq_rows[i], [builder.mul(b, ir.Constant(I64, 32))])
                    x_lo, x_hi = _halves(builder, builder.load(builder.bitcast(xp, _vec(I16, 32).as_pointer()), align=2))
                    dot = builder.add(_pmaddwd(builder, w_lo, x_lo), _pmaddwd(builder, w_hi, x_hi))
                    scale = builder.fmul(d_w, builder.load(builder.gep(xd_rows[i], [b])), flags=FAST)
                    term = builder.fmul(builder.sitofp(dot, _vec(F32, LANES)), _broadcast(builder, scale, LANES), flags=FAST)
                    new_accs.append(builder.fadd(accs[i], term, flags=FAST))
                    if kind == "q8_0":
                        new_offsets.append(offsets[i])
                    else:
                        x_sum = builder.load(builder.gep(xs_rows[i], [b]))
                        new_offsets.append(builder.fadd(offsets[i], builder.fmul(low, x_sum, flags=FAST), flags=FAST))
                return new_accs + new_offsets

            # per token: the lane-wise sum of scale * integer dot, and the blocks' constant terms
            initial = [_splat_const(F32, LANES, 0.0)] * tokens + [ir.Constant(F32, 0.0)] * tokens
            carried = _counted_loop(builder, n_blocks, initial, block, "rowdot")
            accs, offsets = carried[:tokens], carried[tokens:]
            sums = [builder.fadd(_reduce(builder, accs[i]), offsets[i], flags=FAST) for i in range(tokens)]
            return sums[0] if tokens == 1 else context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return row_dot


TILE_TOKENS = 4  # tokens per prefill tile: each block of weights is unpacked once for four tokens
q4_0_row_dot = _make_row_dot("q4_0", 1)
q4_1_row_dot = _make_row_dot("q4_1", 1)
q8_0_row_dot = _make_row_dot("q8_0", 1)
q4_0_tile_dot = _make_row_dot("q4_0", TILE_TOKENS)
q4_1_tile_dot = _make_row_dot("q4_1", TILE_TOKENS)
q8_0_tile_dot = _make_row_dot("q8_0", TILE_TOKENS)


ROWS_CHUNK = 32  # columns weighted_rows_sum handles per call: four 8-lane accumulators


@intrinsic
def weighted_rows_sum(typingctx, weights, n_rows, rows, col, out, out_col):
    """out[out_col + i] = sum_{s < n_rows, weights[s] != 0} weights[s] * rows[s, col + i], i < 32.
    rows: a 2-D C-contiguous float32 or float16-bits (uint16) array (attention's V cache). The 32
    sums stay in registers across all rows, where a loop of slice updates stores them every row."""
    sig = types.void(weights, types.intp, rows, types.intp, out, types.intp)
    half = rows.dtype == types.uint16

    def codegen(context, builder, signature, args):
        wa = context.make_array(signature.args[0])(context, builder, args[0])
        ra = context.make_array(signature.args[2])(context, builder, args[2])
        oa = context.make_array(signature.args[4])(context, builder, args[4])
        n_rows, col, out_col = args[1], args[3], args[5]
        wbase = builder.bitcast(wa.data, F32.as_pointer())
        obase = builder.bitcast(oa.data, F32.as_pointer())
        row_lanes = _row_chunk_reader(builder, ra, col, half)

        def row(s, accs):
            w = builder.load(builder.gep(wbase, [s]))
            use = builder.append_basic_block("wrs.use")
            merge = builder.append_basic_block("wrs.merge")
            skipped_from = builder.block
            builder.cbranch(builder.fcmp_ordered("!=", w, ir.Constant(F32, 0.0)), use, merge)
            builder.position_at_end(use)
            wv = _broadcast(builder, w, LANES)
            updated = [builder.fadd(a, builder.fmul(wv, vals, flags=FAST), flags=FAST)
                       for a, vals in zip(accs, row_lanes(s))]
            used_from = builder.block
            builder.branch(merge)
            builder.position_at_end(merge)
            merged = []
            for a, new in zip(accs, updated):  # a row with weight 0 leaves the sums as they were
                phi = builder.phi(_vec(F32, LANES))
                phi.add_incoming(a, skipped_from)
                phi.add_incoming(new, used_from)
                merged.append(phi)
            return merged

        accs = _counted_loop(builder, n_rows, [_splat_const(F32, LANES, 0.0)] * (ROWS_CHUNK // LANES), row, "wrs")
        for g, a in enumerate(accs):
            p = builder.gep(obase, [builder.add(out_col, ir.Constant(I64, g * LANES))])
            builder.store(a, builder.bitcast(p, _vec(F32, LANES).as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def rows_dot_chunk(typingctx, q, q_col, n_rows, rows, col, out, accumulate):
    """out[s] (+)= sum_{i < 32} q[q_col + i] * rows[s, col + i] for every s < n_rows: attention's
    q . k over 32 columns of the K cache (float32 or float16 bits), q held in registers."""
    sig = types.void(q, types.intp, types.intp, rows, types.intp, out, types.boolean)
    half = rows.dtype == types.uint16

    def codegen(context, builder, signature, args):
        qa = context.make_array(signature.args[0])(context, builder, args[0])
        ra = context.make_array(signature.args[3])(context, builder, args[3])
        oa = context.make_array(signature.args[5])(context, builder, args[5])
        q_col, n_rows, col, accumulate = args[1], args[2], args[4], args[6]
        qbase = builder.bitcast(qa.data, F32.as_pointer())
        obase = builder.bitcast(oa.data, F32.as_pointer())
        row_lanes = _row_chunk_reader(builder, ra, col, half)
        qv = []
        for g in range(ROWS_CHUNK // LANES):
            p = builder.gep(qbase, [builder.add(q_col, ir.Constant(I64, g * LANES))])
            qv.append(builder.load(builder.bitcast(p, _vec(F32, LANES).as_pointer()), align=4))

        def row(s, _):
            acc = None
            for q_lanes, vals in zip(qv, row_lanes(s)):
                prod = builder.fmul(q_lanes, vals, flags=FAST)
                acc = prod if acc is None else builder.fadd(acc, prod, flags=FAST)
            op = builder.gep(obase, [s])
            previous = builder.select(accumulate, builder.load(op), ir.Constant(F32, 0.0))
            builder.store(builder.fadd(previous, _reduce(builder, acc), flags=FAST), op)
            return []

        _counted_loop(builder, n_rows, [], row, "rdc")
        return context.get_dummy_value()

    return sig, codegen
