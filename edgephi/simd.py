"""Explicit-vector block dot products for the decode matrix-vector kernels, written as LLVM IR.

numba's own loops over these blocks reach only a third of what the core can do: its integer
promotion rules widen nibbles to int64, and LLVM's vectoriser then reduces every 32-value block
to a scalar. Here each block is one vector expression: 32 weights (nibbles or int8) widened to
int16, multiplied with the activations quantized to int16 per block of 32, summed in pairs to
int32 (x86's vpmaddwd where the CPU has AVX2, one 512-bit vpmaddwd per block with AVX-512; the
same arithmetic in plain IR elsewhere), then scaled and accumulated in a float vector that is
reduced once per row.

With AVX-512 VNNI, q4 blocks go in pairs: the 64 nibbles are spread to bytes in one shift and one
mask, and the int16 activations x = 256 h + l arrive split into bytes, so the pair's exact dot is
two vpdpbusd (sum of u * h, shifted by 8, plus sum of l * u): half the instructions per block of
the 16-bit path, with the same result. Scales of eight blocks are converted at once. The kernels
also prefetch the rows' bytes PREFETCH_BYTES ahead: without it, two cores stream weights from
memory at 12 GB/s where a plain sum reads 20.

Exactness: the integer dot is exact (|q| <= 128, |x| <= 32767, 32 terms fit int32); the only
rounding beyond float32 arithmetic is the activations' int16 quantization, an error of at most
2^-16 of each block's largest value per element.
"""

from __future__ import annotations

import platform

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import config
from numba.extending import intrinsic

from .errors import EdgephiError

F32 = ir.FloatType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
FAST = ("fast",)
LANES = 8  # float accumulator width: one AVX register


def _target_has(feature: str) -> bool:
    """Whether the CPU numba compiles for has `feature` (NUMBA_CPU_NAME/FEATURES override the host)."""
    if config.CPU_NAME:
        return f"+{feature}" in (config.CPU_FEATURES or "").split(",")
    return bool(llvm.get_host_cpu_features().get(feature, False))


USE_AVX2 = _target_has("avx2")
# 512-bit words: one vpmaddwd per block of 32; with VNNI, q4 blocks go in pairs through vpdpbusd.
USE_AVX512 = _target_has("avx512bw")
USE_VNNI = USE_AVX512 and _target_has("avx512vnni")
ACC_LANES = 16 if USE_AVX512 else 8  # float accumulator width: one vector register

# Without F16C, LLVM turns every float16 conversion into a call to a helper that numba's JIT does
# not link: the kernels would crash, so refuse with a message instead.
if platform.machine().lower() in ("x86_64", "amd64") and not _target_has("f16c"):
    raise EdgephiError("this CPU (or NUMBA_CPU_NAME/NUMBA_CPU_FEATURES) has no F16C float16 instructions, "
                       "which edgephi's numba kernels need (x86-64 CPUs from about 2012 on); "
                       "an ONNX export runs on onnxruntime without them")


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat_const(t, n, value):
    return ir.Constant(_vec(t, n), [value] * n)


def _lanes(values):
    return ir.Constant(_vec(I32, len(values)), list(values))


def _pmaddwd(builder, a, b):
    """<16 x i16> a, b -> <8 x i32>: a[2i]*b[2i] + a[2i+1]*b[2i+1]."""
    if USE_AVX2:
        return _intrinsic_call(builder, "llvm.x86.avx2.pmadd.wd", _vec(I32, 8), [a, b])
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


def _counted_loop(builder, count, initial, body, name, start=None):
    """Emit `for i in range(start or 0, count)` carrying the values `initial`: body(i, values) emits
    the loop body (it may add blocks) and returns the next values. Returns the values after the loop."""
    entry = builder.block
    head = builder.append_basic_block(f"{name}.head")
    loop = builder.append_basic_block(f"{name}.body")
    done = builder.append_basic_block(f"{name}.done")
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(I64)
    i.add_incoming(ir.Constant(I64, 0) if start is None else start, entry)
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


def _lanes_at(builder, base, byte_offset, half, count=LANES):
    """`count` float32 values at base + byte_offset, stored as float32 or as float16 bits."""
    p = builder.gep(base, [byte_offset])
    if half:
        bits = builder.load(builder.bitcast(p, _vec(I16, count).as_pointer()), align=2)
        return builder.fpext(builder.bitcast(bits, _vec(ir.HalfType(), count)), _vec(F32, count))
    return builder.load(builder.bitcast(p, _vec(F32, count).as_pointer()), align=4)


def _row_chunk_reader(builder, rows, col, half):
    """lanes(s): row s, columns col .. col + ROWS_CHUNK - 1 of a 2-D C-contiguous array `rows` (a
    numba array struct) of float32 or float16 bits, as ROWS_CHUNK / 8 float vectors of 8 lanes.
    Asking for row s also prefetches the same columns PREFETCH_ROWS rows on: the rows of a KV cache
    head are strided, which the hardware prefetchers follow only within a page."""
    itemsize = 2 if half else 4
    row_bytes = builder.extract_value(rows.strides, 0)
    base = builder.bitcast(rows.data, I8.as_pointer())
    col_bytes = builder.mul(col, ir.Constant(I64, itemsize))

    def lanes(s):
        start = builder.add(builder.mul(s, row_bytes), col_bytes)
        _prefetch(builder, base, builder.add(start, builder.mul(row_bytes, ir.Constant(I64, PREFETCH_ROWS))), 0)
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


def _block_dot(builder, w, x):
    """<32 x i16> weights and activations -> ACC_LANES int32 partial sums of their products."""
    if USE_AVX512:
        return _intrinsic_call(builder, "llvm.x86.avx512.pmaddw.d.512", _vec(I32, 16), [w, x])
    (w_lo, w_hi), (x_lo, x_hi) = _halves(builder, w), _halves(builder, x)
    return builder.add(_pmaddwd(builder, w_lo, x_lo), _pmaddwd(builder, w_hi, x_hi))


def _intrinsic_call(builder, name, result, args):
    fnty = ir.FunctionType(result, [a.type for a in args])
    fn = builder.module.globals.get(name) or ir.Function(builder.module, fnty, name)
    return builder.call(fn, args)


def _prefetch(builder, base, offset, ahead):
    """Ask for the cache line at base + offset + ahead (bytes) before its use (read, keep in all levels)."""
    ptr = builder.gep(base, [builder.add(offset, ir.Constant(I64, ahead))])
    _intrinsic_call(builder, "llvm.prefetch.p0", ir.VoidType(),
                    [ptr, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def _vpdpbusd(builder, acc, unsigned_bytes, signed_bytes):
    """acc[i] + sum_{j < 4} u[4i + j] * s[4i + j] over <64 x i8> (AVX-512 VNNI), no saturation."""
    v16 = _vec(I32, 16)
    return _intrinsic_call(builder, "llvm.x86.avx512.vpdpbusd.512", v16,
                           [acc, builder.bitcast(unsigned_bytes, v16), builder.bitcast(signed_bytes, v16)])


# PAIR_ORDER, the byte order of a pair of q4 blocks A, B (32 packed bytes) once its nibbles are
# spread to 64 bytes: A's values 0..15, B's 0..15, A's 16..31, B's 16..31. quantize_activations
# writes each pair's activations in this order, split into low bytes (unsigned) and high bytes (signed).
PAIR_BYTES = 128  # activation bytes per pair of blocks: 64 low bytes, then 64 high bytes
# Rows stream from memory several times faster when the kernels ask for their bytes this far ahead
# (12 -> 17-19 GB/s on two cores here): the hardware prefetchers alone leave the core waiting.
PREFETCH_BYTES = 4096
GROUP_BLOCKS = 8  # blocks whose scales are converted at once: a float16 load fills one 8-lane vector


def _pair_weights(builder, qbase, row_offset, p):
    """The 64 nibbles of blocks 2p and 2p + 1 as <64 x i8> values 0..15, in PAIR_ORDER."""
    ptr = builder.gep(qbase, [builder.add(row_offset, builder.mul(p, ir.Constant(I64, 32)))])
    packed = builder.load(builder.bitcast(ptr, _vec(I8, 32).as_pointer()), align=1)
    twice = builder.bitcast(builder.shuffle_vector(packed, packed, _lanes(list(range(32)) * 2)), _vec(I16, 32))
    shifted = builder.lshr(twice, ir.Constant(_vec(I16, 32), [0] * 16 + [4] * 16))  # high nibbles down
    return builder.and_(builder.bitcast(shifted, _vec(I8, 64)), _splat_const(I8, 64, 15))


def _pair_dot(builder, nibbles, xb_row, p):
    """Exact int32 dot partials of a pair's nibbles with its int16 activations x = 256 h + l, as
    16 lanes (lanes 0-3 and 8-11 block A, 4-7 and 12-15 block B): (sum u h) * 256 + sum l u,
    two vpdpbusd on bytes instead of four vpmaddwd on words. |sum u h| * 256 < 2^21: no overflow."""
    base = builder.gep(xb_row, [builder.mul(p, ir.Constant(I64, PAIR_BYTES))])
    low = builder.load(builder.bitcast(base, _vec(I8, 64).as_pointer()), align=1)
    high_ptr = builder.gep(base, [ir.Constant(I64, PAIR_BYTES // 2)])
    high = builder.load(builder.bitcast(high_ptr, _vec(I8, 64).as_pointer()), align=1)
    partial = _vpdpbusd(builder, ir.Constant(_vec(I32, 16), None), nibbles, high)
    partial = builder.shl(partial, _splat_const(I32, 16, 8))
    return _vpdpbusd(builder, partial, low, nibbles)


def _make_row_dot(kind: str, tokens: int):
    """row_dot(qs, d, m, xq, xb, xd, xs, n, t0): row n of a q4_0/q4_1/q8_0 matrix (planes qs, d, m
    as in kernels.py) dotted with tokens t0 .. t0 + tokens - 1 of activations quantized per block:
    x_hat[t, 32b + j] = xq[t, 32b + j] * xd[t, b], xs[t, b] = sum of the block's x_hat (for q4_1's
    minimum and q4_0's -8); xb holds the same int16 values split into bytes for pairs of blocks
    (PAIR_ORDER), read by the AVX-512 VNNI path. Returns a float32, or a tuple of them for tiles of
    several tokens, which unpack each block of weights once for all of them (prefill)."""
    pairs = USE_VNNI and kind != "q8_0"

    @intrinsic
    def row_dot(typingctx, qs, d, m, xq, xb, xd, xs, n, t0):
        result = types.float32 if tokens == 1 else types.UniTuple(types.float32, tokens)
        sig = result(qs, d, m, xq, xb, xd, xs, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            qa, da, ma, xqa, xba, xda, xsa = (context.make_array(t)(context, builder, a)
                                              for t, a in zip(signature.args[:7], args[:7]))
            n_blocks = builder.extract_value(da.shape, 1)
            row, t0 = args[7], args[8]
            q_row = builder.mul(row, builder.extract_value(qa.strides, 0))
            s_row = builder.mul(row, builder.extract_value(da.strides, 0))
            qbase = builder.bitcast(qa.data, I8.as_pointer())
            dbase = builder.bitcast(da.data, I8.as_pointer())
            mbase = builder.bitcast(ma.data, I8.as_pointer())
            xq_rows, xb_rows, xd_rows, xs_rows = (_token_rows(builder, a, t0, tokens, elem)
                                                  for a, elem in ((xqa, I16), (xba, I8), (xda, F32), (xsa, F32)))

            def block(b, carried):
                accs, offsets = carried[:tokens], carried[tokens:]
                w = _block_weights(builder, kind, qbase, q_row, b)
                s_off = builder.add(s_row, builder.mul(b, ir.Constant(I64, 2)))
                block_bytes = 32 if kind == "q8_0" else 16
                block_at = builder.add(q_row, builder.mul(b, ir.Constant(I64, block_bytes)))
                _prefetch(builder, qbase, block_at, PREFETCH_BYTES)
                _prefetch(builder, dbase, s_off, PREFETCH_BYTES * 2 // block_bytes)
                d_w = _f16_at(builder, dbase, s_off)
                if kind == "q4_1":
                    _prefetch(builder, mbase, s_off, PREFETCH_BYTES * 2 // block_bytes)
                    low = _f16_at(builder, mbase, s_off)
                elif kind == "q4_0":
                    low = builder.fmul(d_w, ir.Constant(F32, -8.0))  # values are q - 8
                new_accs, new_offsets = [], []
                for i in range(tokens):
                    xp = builder.gep(xq_rows[i], [builder.mul(b, ir.Constant(I64, 32))])
                    dot = _block_dot(builder, w, builder.load(builder.bitcast(xp, _vec(I16, 32).as_pointer()), align=2))
                    scale = builder.fmul(d_w, builder.load(builder.gep(xd_rows[i], [b])), flags=FAST)
                    term = builder.fmul(builder.sitofp(dot, _vec(F32, ACC_LANES)),
                                        _broadcast(builder, scale, ACC_LANES), flags=FAST)
                    new_accs.append(builder.fadd(accs[i], term, flags=FAST))
                    if kind == "q8_0":
                        new_offsets.append(offsets[i])
                    else:
                        x_sum = builder.load(builder.gep(xs_rows[i], [b]))
                        new_offsets.append(builder.fadd(offsets[i], builder.fmul(low, x_sum, flags=FAST), flags=FAST))
                return new_accs + new_offsets

            def span(width):
                """The loop body over blocks width * u .. width * u + width - 1, in pairs: their scales
                and constant terms as width-lane vectors, each pair's 16 lanes of scales picked out."""
                lanes_t = _vec(F32, width)

                def body(u, carried):
                    accs, offsets = carried[:tokens], carried[tokens:]
                    b0 = builder.mul(u, ir.Constant(I64, width))
                    s_off = builder.add(s_row, builder.mul(b0, ir.Constant(I64, 2)))
                    d_w = _lanes_at(builder, dbase, s_off, True, width)
                    if kind == "q4_1":
                        low = _lanes_at(builder, mbase, s_off, True, width)
                    else:
                        low = builder.fmul(d_w, _splat_const(F32, width, -8.0), flags=FAST)  # values are q - 8
                    scales, new_offsets = [], []
                    for i in range(tokens):
                        x_d, x_s = (builder.load(builder.bitcast(builder.gep(rows[i], [b0]), lanes_t.as_pointer()),
                                                 align=4) for rows in (xd_rows, xs_rows))
                        scales.append(builder.fmul(d_w, x_d, flags=FAST))
                        new_offsets.append(builder.fadd(offsets[i], builder.fmul(low, x_s, flags=FAST), flags=FAST))
                    if width == GROUP_BLOCKS:  # 128 bytes of nibbles, 16 of scales
                        group_at = builder.add(q_row, builder.mul(b0, ir.Constant(I64, 16)))
                        for line in (PREFETCH_BYTES, PREFETCH_BYTES + 64):
                            _prefetch(builder, qbase, group_at, line)
                        _prefetch(builder, dbase, s_off, PREFETCH_BYTES // 8)
                        if kind == "q4_1":
                            _prefetch(builder, mbase, s_off, PREFETCH_BYTES // 8)
                    for k in range(width // 2):
                        p = builder.add(builder.mul(u, ir.Constant(I64, width // 2)), ir.Constant(I64, k))
                        nibbles = _pair_weights(builder, qbase, q_row, p)
                        spread = _lanes(([2 * k] * 4 + [2 * k + 1] * 4) * 2)  # PAIR_ORDER's lanes of A and B
                        for i in range(tokens):
                            dot = builder.sitofp(_pair_dot(builder, nibbles, xb_rows[i], p), _vec(F32, 16))
                            scale = builder.shuffle_vector(scales[i], scales[i], spread)
                            accs[i] = builder.fadd(accs[i], builder.fmul(dot, scale, flags=FAST), flags=FAST)
                    return accs + new_offsets
                return body

            zero_acc = _splat_const(F32, ACC_LANES, 0.0)
            if pairs:
                # groups of eight blocks (their scales converted in one go), then pairs, then an odd
                # count's last block on 16-bit words
                accs, offsets = [zero_acc] * tokens, [ir.Constant(F32, 0.0)] * tokens
                start = None
                for width, shift in ((GROUP_BLOCKS, GROUP_BLOCKS.bit_length() - 1), (2, 1)):
                    count = builder.ashr(n_blocks, ir.Constant(I64, shift))
                    if start is not None:
                        start = builder.ashr(start, ir.Constant(I64, shift))
                    carried = _counted_loop(builder, count, accs + [_splat_const(F32, width, 0.0)] * tokens,
                                            span(width), f"q4span{width}", start=start)
                    accs = carried[:tokens]
                    offsets = [builder.fadd(o, _reduce(builder, c), flags=FAST)
                               for o, c in zip(offsets, carried[tokens:])]
                    start = builder.shl(count, ir.Constant(I64, shift))
                carried = _counted_loop(builder, n_blocks, accs + offsets, block, "rowdot", start=start)
            else:
                initial = [zero_acc] * tokens + [ir.Constant(F32, 0.0)] * tokens
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


PREFETCH_ROWS = 16  # KV cache rows ahead that attention asks for
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
