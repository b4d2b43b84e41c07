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


def _make_row_dot(kind: str):
    """row_dot(qs, d, m, xq, xd, xs, n) -> float32: row n of a q4_0/q4_1/q8_0 matrix (planes qs, d, m
    as in kernels.py) dotted with activations quantized per block: x_hat[32b + j] = xq[32b + j] * xd[b],
    xs[b] = sum of the block's x_hat (for q4_1's minimum and q4_0's -8)."""

    @intrinsic
    def row_dot(typingctx, qs, d, m, xq, xd, xs, n):
        sig = types.float32(qs, d, m, xq, xd, xs, types.intp)

        def codegen(context, builder, signature, args):
            qa, da, ma, xqa, xda, xsa = (context.make_array(t)(context, builder, a)
                                         for t, a in zip(signature.args[:6], args[:6]))
            n_blocks = builder.extract_value(da.shape, 1)
            row = args[6]
            q_row = builder.mul(row, builder.extract_value(qa.strides, 0))
            s_row = builder.mul(row, builder.extract_value(da.strides, 0))
            qbase = builder.bitcast(qa.data, I8.as_pointer())
            dbase = builder.bitcast(da.data, I8.as_pointer())
            mbase = builder.bitcast(ma.data, I8.as_pointer())
            xqbase = builder.bitcast(xqa.data, I16.as_pointer())
            xdbase = builder.bitcast(xda.data, F32.as_pointer())
            xsbase = builder.bitcast(xsa.data, F32.as_pointer())

            entry = builder.block
            head = builder.append_basic_block("rowdot.head")
            body = builder.append_basic_block("rowdot.body")
            done = builder.append_basic_block("rowdot.done")
            builder.branch(head)
            builder.position_at_end(head)
            b = builder.phi(I64)
            acc = builder.phi(_vec(F32, LANES))  # sum of scale * integer dot, lane-wise
            offset = builder.phi(F32)  # sum of the blocks' constant terms
            b.add_incoming(ir.Constant(I64, 0), entry)
            acc.add_incoming(_splat_const(F32, LANES, 0.0), entry)
            offset.add_incoming(ir.Constant(F32, 0.0), entry)
            builder.cbranch(builder.icmp_signed("<", b, n_blocks), body, done)

            builder.position_at_end(body)
            xp = builder.gep(xqbase, [builder.mul(b, ir.Constant(I64, 32))])
            x16 = builder.load(builder.bitcast(xp, _vec(I16, 32).as_pointer()), align=2)
            w16 = _block_weights(builder, kind, qbase, q_row, b)
            w_lo, w_hi = _halves(builder, w16)
            x_lo, x_hi = _halves(builder, x16)
            dot = builder.add(_pmaddwd(builder, w_lo, x_lo), _pmaddwd(builder, w_hi, x_hi))
            s_off = builder.add(s_row, builder.mul(b, ir.Constant(I64, 2)))
            d_w = _f16_at(builder, dbase, s_off)
            scale = builder.fmul(d_w, builder.load(builder.gep(xdbase, [b])), flags=FAST)
            term = builder.fmul(builder.sitofp(dot, _vec(F32, LANES)), _broadcast(builder, scale, LANES), flags=FAST)
            acc_next = builder.fadd(acc, term, flags=FAST)
            if kind == "q8_0":
                offset_next = offset
            else:
                x_sum = builder.load(builder.gep(xsbase, [b]))
                # q4_1: + m * sum(x); q4_0: values are q - 8, so - 8 * d * sum(x)
                low = _f16_at(builder, mbase, s_off) if kind == "q4_1" else builder.fmul(d_w, ir.Constant(F32, -8.0))
                offset_next = builder.fadd(offset, builder.fmul(low, x_sum, flags=FAST), flags=FAST)
            last = builder.block
            b.add_incoming(builder.add(b, ir.Constant(I64, 1)), last)
            acc.add_incoming(acc_next, last)
            offset.add_incoming(offset_next, last)
            builder.branch(head)

            builder.position_at_end(done)
            return builder.fadd(_reduce(builder, acc), offset, flags=FAST)

        return sig, codegen

    return row_dot


q4_0_row_dot = _make_row_dot("q4_0")
q4_1_row_dot = _make_row_dot("q4_1")
q8_0_row_dot = _make_row_dot("q8_0")
