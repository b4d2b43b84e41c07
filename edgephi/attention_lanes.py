"""Prompt steps' attention with one token per float lane: the multiply-add of small matrices whose
result rows are LANE_TOKENS floats, one per token. A cached row is then loaded once for all the
step's tokens (the row kernels of attention_rows.py load it once per token and head), and each
token's sums run in one order, row after row, whichever other tokens share its lanes.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .llvm_ir import F32, I8, broadcast, const, counted_loop, prefetch, vec

LANE_TOKENS = 16  # tokens per attention call of a prompt step: one float lane each
LANE_ROWS = 32  # cached rows widened to float32 at a time (kernels.attention_prompt's tiles)
PRODUCT_ROWS = 4  # result rows in registers: 4 x 16 lanes fit AVX2's and NEON's too (8 was no faster on Zen 5)
CONTRACT = ("contract",)  # a * b + c may become one fma, but sums are never reordered


@intrinsic
def lane_products(typingctx, a, a_off, a_row, a_col, m, k, b, b_row0, c, accumulate):
    """c[i, :] (+)= sum_{j < k} a[a_off + i * a_row + j * a_col] * b[b_row0 + j, :] for i < m, with
    b and c float32 arrays viewed as rows of LANE_TOKENS floats (flat, C-contiguous) and a flat
    float32. Each sum runs over j in order, one fused multiply-add after another."""
    sig = types.void(a, types.intp, types.intp, types.intp, types.intp, types.intp, b, types.intp, c, types.boolean)
    row_type = vec(F32, LANE_TOKENS)

    def codegen(context, builder, signature, args):
        aa = context.make_array(signature.args[0])(context, builder, args[0])
        ba = context.make_array(signature.args[6])(context, builder, args[6])
        ca = context.make_array(signature.args[8])(context, builder, args[8])
        a_off, a_row, a_col, m, k, b_row0, accumulate = args[1], args[2], args[3], args[4], args[5], args[7], args[9]
        abase = builder.bitcast(aa.data, F32.as_pointer())
        brows = builder.bitcast(ba.data, row_type.as_pointer())
        crows = builder.bitcast(ca.data, row_type.as_pointer())
        zero = ir.Constant(row_type, [0.0] * LANE_TOKENS)

        def rows_from(i0, count):
            """Result rows i0 .. i0 + count - 1, accumulated in registers over all j."""
            targets = [builder.gep(crows, [builder.add(i0, const(r))]) for r in range(count)]
            starts = [builder.select(accumulate, builder.load(p, align=4), zero) for p in targets]
            a_rows = [builder.add(a_off, builder.mul(builder.add(i0, const(r)), a_row)) for r in range(count)]

            def step(j, sums):
                bj = builder.load(builder.gep(brows, [builder.add(b_row0, j)]), align=4)
                a_j = builder.mul(j, a_col)
                out = []
                for at, total in zip(a_rows, sums):
                    value = builder.load(builder.gep(abase, [builder.add(at, a_j)]))
                    out.append(builder.fadd(total, builder.fmul(broadcast(builder, value, LANE_TOKENS), bj,
                                                                flags=CONTRACT), flags=CONTRACT))
                return out

            for p, total in zip(targets, counted_loop(builder, k, starts, step, "lp.j")):
                builder.store(total, p, align=4)

        whole = builder.sdiv(m, const(PRODUCT_ROWS))
        counted_loop(builder, whole, [], lambda t, _: rows_from(builder.mul(t, const(PRODUCT_ROWS)), PRODUCT_ROWS)
                     or [], "lp.tile")
        counted_loop(builder, m, [], lambda i, _: rows_from(i, 1) or [], "lp.rest",
                     start=builder.mul(whole, const(PRODUCT_ROWS)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch_row(typingctx, rows, s, col, count):
    """Ask for row s of a 2-D C-contiguous array, elements col .. col + count - 1, ahead of use:
    a KV cache head's rows lie a whole cache row apart, past what the hardware prefetchers follow."""
    sig = types.void(rows, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        ra = context.make_array(signature.args[0])(context, builder, args[0])
        s, col, count = args[1], args[2], args[3]
        itemsize = const(context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype)))
        base = builder.bitcast(ra.data, I8.as_pointer())
        start = builder.add(builder.mul(s, builder.extract_value(ra.strides, 0)), builder.mul(col, itemsize))
        lines = builder.sdiv(builder.add(builder.mul(count, itemsize), const(63)), const(64))
        counted_loop(builder, lines, [], lambda i, _: prefetch(builder, base, builder.add(start, builder.mul(i, const(64))), 0)
                     or [], "pf")
        return context.get_dummy_value()

    return sig, codegen
