"""The prefill GEMM of quantized weights, as explicit-vector LLVM IR: a panel of rows is unpacked
once into int16 (repack_panel), then every tile of tokens runs through it (panel_tile).

The row dots (row_dot.py) take one row and four tokens: each block of weights is unpacked for
only four tokens, and every block's int32 sums are scaled on their own. Prefill has many tokens,
so here the rows are unpacked once for all of them into a panel laid out row-minor: for each block
and each pair of values (k, k + 1), the panel's rows' int16 pairs side by side (a panel is two
vectors of rows: 32 rows on AVX-512, 16 on 8-lane instruction sets). A multiply-add of
words (vpdpwssd; pmaddwd elsewhere) then takes one pair of one token, broadcast, against a vector
of rows, and each lane sums its own row over the block: no horizontal sums, one scaling per
block for a whole vector of rows.

The integers are the row dots' exactly: weights are the block's integer values with the centre
taken off (q4_0 -8, q5_0 -16, q6_k -32 times its half's scale), activations the int16 of
quantize_activations. What is left per block is a float scale and, for formats with a minimum,
an offset times the activations' block sum.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .block_codecs import CODECS, RowPlanes
from .isa_ops import op_set
from .llvm_ir import (
    F32,
    FAST,
    I8,
    I16,
    I32,
    array_rows,
    broadcast,
    const,
    counted_loop,
    f16_at,
    lanes,
    splat,
    vec,
)
from .quant import FORMATS

PAIRS = 16  # pairs of values per block of 32
# Tokens per tile for an ISA's vector width: the int32 sums of two vectors of rows per token,
# their float accumulators, two vectors of weights and their scales stay in the register file
# (32 zmm; 16 ymm).
TILE_TOKENS = {16: 4, 8: 2}


def panel_lanes(ops):
    """The lanes of a panel's vector of rows: the ISA's accumulator, or its own (Arm's panels
    keep the plain IR's eight: the transpose makes sixteen rows at a time)."""
    return ops.panel_lanes or ops.acc_lanes


def _word_dot_add(ops):
    """(builder, acc <L x i32>, rows' pairs <2L x i16>, a token's pair broadcast) -> <L x i32>."""
    if ops.word_dot_add is not None:
        return ops.word_dot_add
    word_dot = ops.word_pairs or (ops.block_dot if ops.acc_lanes == 16 else ops.half_dot)
    return lambda builder, acc, a, b: builder.add(acc, word_dot(builder, a, b))


@intrinsic
def panel_shape(typingctx, isa):
    """(rows per panel, tokens per tile) for the ISA, compile-time constants."""
    width = panel_lanes(op_set(isa))
    shape = (2 * width, TILE_TOKENS[width])
    sig = types.UniTuple(types.intp, 2)(isa)

    def codegen(context, builder, signature, args):
        return context.make_tuple(builder, signature.return_type, [const(v) for v in shape])

    return sig, codegen


def _block_words(builder, codec, row, b):
    """Block b's 32 weights as <32 x i16> integers w, and its float scale s and offset o (or None),
    so that weight j is s * w[j] + o."""
    q = codec.values(builder, row, b)
    if not codec.nibbles:  # q8_0
        return builder.sext(q, vec(I16, 32)), codec.scale(builder, row, b), None
    w = builder.zext(q, vec(I16, 32))
    if codec.two_scales:  # q6_k: (q - 32) times each half's int8 scale, d for the super-block
        sc = builder.load(builder.bitcast(row.at(builder, "sc", builder.mul(b, const(2))), vec(I8, 2).as_pointer()),
                          align=1)
        halves = builder.shuffle_vector(sc, sc, ir.Constant(vec(I32, 32), [0] * 16 + [1] * 16))
        w = builder.mul(builder.sub(w, splat(I16, 32, 32)), builder.sext(halves, vec(I16, 32)))
        u = builder.lshr(b, const(3))
        return w, f16_at(builder, row.base["d"], builder.add(row.row["d"], builder.mul(u, const(2)))), None
    if codec.offset == "centre":
        return builder.sub(w, splat(I16, 32, codec.centre)), codec.scale(builder, row, b), None
    scale = codec.scale(builder, row, b)
    return w, scale, codec.offset_term(builder, scale, row, b)


def _transpose(builder, vectors):
    """Sixteen <16 x i32> vectors -> sixteen whose lane r of vector p is lane p of vector r: four
    rounds, each swapping one bit of the vector's index with the same bit of the lane's."""
    v = list(vectors)
    for bit in (1, 2, 4, 8):
        low = [lane if not lane & bit else PAIRS + (lane & ~bit) for lane in range(PAIRS)]
        high = [lane | bit if not lane & bit else PAIRS + lane for lane in range(PAIRS)]
        for i in range(PAIRS):
            if not i & bit:
                a, b = v[i], v[i | bit]
                v[i], v[i | bit] = builder.shuffle_vector(a, b, lanes(low)), builder.shuffle_vector(a, b, lanes(high))
    return v


FORMAT_CASES = [(FORMATS[name].ggml_type, codec) for name, codec in CODECS.items()]
PLANES = ("qs", "d", "m", "qh", "sc")


@intrinsic
def repack_panel(typingctx, isa, w, n0, nr, n_blocks, wq, ws, wo):
    """Rows n0 .. n0 + R - 1 (n_blocks blocks of 32 each) of the quantized Linear w into a panel of R
    rows (panel_shape's): wq
    int16 (blocks * PAIRS * R * 2) holds block b's pair p of row r at (b PAIRS + p) R + r (as one
    int32), ws and wo float32 (blocks * R) its scale and offset (left unwritten without one).
    Rows from nr on repeat row n0 (their sums are computed and not stored)."""
    sig = types.void(isa, w, types.intp, types.intp, types.intp, wq, ws, wo)
    panel_rows = 2 * panel_lanes(op_set(isa))

    def codegen(context, builder, signature, args):
        w_type = signature.args[1]
        _, w_rec, n0, nr, n_blocks, wq_arr, ws_arr, wo_arr = args

        def array(name):
            i = w_type.fields.index(name)
            return context.make_array(w_type.types[i])(context, builder, builder.extract_value(w_rec, i))

        arrays = {p: array(p) for p in PLANES}
        wq_p, ws_p, wo_p = (builder.bitcast(context.make_array(signature.args[j])(context, builder, a).data, t)
                            for j, a, t in ((5, wq_arr, I32.as_pointer()), (6, ws_arr, F32.as_pointer()),
                                            (7, wo_arr, F32.as_pointer())))
        fmt = builder.extract_value(w_rec, w_type.fields.index("format"))
        bases = {p: builder.bitcast(a.data, I8.as_pointer()) for p, a in arrays.items()}
        # sixteen rows at a time, block by block: each row's block is decoded (the one part that
        # depends on the format) into a vector of words, and a transpose turns the sixteen into
        # sixteen vectors of rows, written whole while in L1. The format's branch and the rows'
        # offsets are settled once per sixteen rows, and the rows unrolled: per block and row
        # they cost more than the decoding did.

        def one_half(half, carried):
            h = builder.mul(half, const(PAIRS))  # the first of these sixteen rows
            firsts = [builder.add(h, const(r)) for r in range(PAIRS)]
            ns = [builder.select(builder.icmp_signed("<", i, nr), builder.add(n0, i), n0) for i in firsts]
            rows = [RowPlanes(base=bases, row={p: builder.mul(n, builder.extract_value(a.strides, 0))
                                               for p, a in arrays.items()}, n_blocks=n_blocks) for n in ns]

            def decode(codec):
                def one_block(b, inner):
                    words = []
                    for i, row in zip(firsts, rows):
                        values, scale, offset = _block_words(builder, codec, row, b)
                        words.append(builder.bitcast(values, vec(I32, PAIRS)))
                        at = builder.add(builder.mul(b, const(panel_rows)), i)
                        builder.store(scale, builder.gep(ws_p, [at]))
                        if offset is not None:  # panel_tile reads offsets only of formats with a minimum
                            builder.store(offset, builder.gep(wo_p, [at]))
                    for p, column in enumerate(_transpose(builder, words)):
                        at = builder.add(builder.mul(b, const(PAIRS * panel_rows)), builder.add(h, const(p * panel_rows)))
                        builder.store(column, builder.bitcast(builder.gep(wq_p, [at]), vec(I32, PAIRS).as_pointer()),
                                      align=4)
                    return inner
                counted_loop(builder, n_blocks, [], one_block, f"repack.{codec.name}")

            cases = [(ggml_type, codec, builder.append_basic_block(f"repack.{codec.name}"))
                     for ggml_type, codec in FORMAT_CASES]
            merge = builder.append_basic_block("repack.done")
            switch = builder.switch(fmt, cases[-1][2])
            for ggml_type, _, block in cases[:-1]:
                switch.add_case(ir.Constant(fmt.type, ggml_type), block)
            for _, codec, block in cases:
                builder.position_at_end(block)
                decode(codec)
                builder.branch(merge)
            builder.position_at_end(merge)
            return carried
        counted_loop(builder, const(panel_rows // PAIRS), [], one_half, "repack.halves")
        return context.get_dummy_value()

    return sig, codegen


def _emit_tile(builder, ops, panel, tokens, n_blocks):
    """The float sums of one panel with len(tokens) tokens' activations (xq i16*, xd f32*, xs f32*),
    without the offsets: per token, two <L x float> vectors of rows."""
    width = panel_lanes(ops)
    panel_rows = 2 * width
    word_dot_add = _word_dot_add(ops)
    wq_p, ws_p, _ = panel
    words_t = vec(I16, 2 * width)
    n = len(tokens)

    def block(b, accs):
        sums = [[splat(I32, width, 0)] * 2 for _ in range(n)]
        base = builder.mul(b, const(PAIRS * panel_rows))
        for p in range(PAIRS):
            w = [builder.load(builder.bitcast(builder.gep(wq_p, [builder.add(base, const(p * panel_rows + v * width))]),
                                              words_t.as_pointer()), align=4) for v in range(2)]  # wq_p: i32*, pairs
            for t, (xq, _, _) in enumerate(tokens):
                at = builder.add(builder.mul(b, const(PAIRS)), const(p))
                pair = builder.load(builder.gep(builder.bitcast(xq, I32.as_pointer()), [at]), align=4)
                x = builder.bitcast(broadcast(builder, pair, width), words_t)
                for v in range(2):
                    sums[t][v] = word_dot_add(builder, sums[t][v], w[v], x)
        at = builder.mul(b, const(panel_rows))
        scales = [builder.load(builder.bitcast(builder.gep(ws_p, [builder.add(at, const(v * width))]),
                                               vec(F32, width).as_pointer()), align=4) for v in range(2)]
        new = []
        for t, (_, xd, _) in enumerate(tokens):
            x_d = broadcast(builder, builder.load(builder.gep(xd, [b])), width)
            for v in range(2):
                scale = builder.fmul(scales[v], x_d, flags=FAST)
                new.append(builder.fadd(accs[2 * t + v], builder.fmul(builder.sitofp(sums[t][v], vec(F32, width)),
                                                                      scale, flags=FAST), flags=FAST))
        return new

    zero = splat(F32, width, 0.0)
    accs = counted_loop(builder, n_blocks, [zero] * (2 * n), block, "panel.blocks")
    return [[accs[2 * t], accs[2 * t + 1]] for t in range(n)]


def _emit_offsets(builder, width, panel, tokens, n_blocks, sums):
    """sums plus each block's offsets times the token's activation sum (formats with a minimum)."""
    wo_p = panel[2]
    n = len(tokens)

    def block(b, accs):
        at = builder.mul(b, const(2 * width))
        offsets = [builder.load(builder.bitcast(builder.gep(wo_p, [builder.add(at, const(v * width))]),
                                                vec(F32, width).as_pointer()), align=4) for v in range(2)]
        new = []
        for t, (_, _, xs) in enumerate(tokens):
            x_s = broadcast(builder, builder.load(builder.gep(xs, [b])), width)
            new += [builder.fadd(accs[2 * t + v], builder.fmul(offsets[v], x_s, flags=FAST), flags=FAST)
                    for v in range(2)]
        return new

    accs = counted_loop(builder, n_blocks, [v for pair in sums for v in pair], block, "panel.offsets")
    return [[accs[2 * t], accs[2 * t + 1]] for t in range(n)]


@intrinsic
def panel_tile(typingctx, isa, wq, ws, wo, offsets, act, n_blocks, t0, nt, out, n0, nr):
    """out[t0 + t, n0 + r] = row r of the panel (repack_panel) dotted with token t0 + t of the
    Activations act over its first n_blocks blocks of 32, for t < nt (at most panel_shape's tokens)
    and r < nr. `offsets`: whether the panel's offsets are to be added (formats with a minimum). A partial tile computes the full
    one on repeated tokens and stores what it owns."""
    i = types.intp
    sig = types.void(isa, wq, ws, wo, types.boolean, act, i, i, i, out, i, i)
    ops = op_set(isa)
    width = panel_lanes(ops)
    n = TILE_TOKENS[width]

    def codegen(context, builder, signature, args):
        _, wq_arr, ws_arr, wo_arr, with_offsets, act_rec, n_blocks, t0, nt, out_arr, n0, nr = args
        panel = tuple(builder.bitcast(context.make_array(signature.args[j])(context, builder, a).data, t)
                      for j, a, t in ((1, wq_arr, I32.as_pointer()), (2, ws_arr, F32.as_pointer()),
                                      (3, wo_arr, F32.as_pointer())))
        act_type = signature.args[5]

        def act_array(name):
            j = act_type.fields.index(name)
            return context.make_array(act_type.types[j])(context, builder, builder.extract_value(act_rec, j))

        rows = {}
        for name, elem in (("xq", I16), ("xd", F32), ("xs", F32)):
            arr = act_array(name)
            first = array_rows(builder, arr, t0, n, elem)
            rows[name] = [first[0]] + [builder.select(builder.icmp_signed("<", const(t), nt), first[t], first[0])
                                       for t in range(1, n)]
        tokens = [(rows["xq"][t], rows["xd"][t], rows["xs"][t]) for t in range(n)]

        plain = _emit_tile(builder, ops, panel, tokens, n_blocks)
        before = builder.block
        with builder.if_then(with_offsets):
            offset = _emit_offsets(builder, width, panel, tokens, n_blocks, plain)
            after = builder.block
        sums = []
        for t in range(n):
            pair = []
            for v in range(2):
                phi = builder.phi(vec(F32, width))
                phi.add_incoming(plain[t][v], before)
                phi.add_incoming(offset[t][v], after)
                pair.append(phi)
            sums.append(pair)

        o_s = context.make_array(signature.args[9])(context, builder, out_arr)
        outs = array_rows(builder, o_s, t0, n, F32)
        whole = builder.icmp_signed("==", nr, const(2 * width))
        for t in range(n):
            with builder.if_then(builder.icmp_signed("<", const(t), nt)):
                for v in range(2):
                    at = builder.gep(outs[t], [builder.add(n0, const(v * width))])
                    with builder.if_else(whole) as (then, otherwise):
                        with then:
                            builder.store(sums[t][v], builder.bitcast(at, vec(F32, width).as_pointer()), align=4)
                        with otherwise:
                            def lane(j, carried, v=v, t=t, at=at):
                                keep = builder.icmp_signed("<", builder.add(j, const(v * width)), nr)
                                with builder.if_then(keep):
                                    builder.store(builder.extract_element(sums[t][v], j), builder.gep(at, [j]))
                                return carried
                            counted_loop(builder, const(width), [], lane, "panel.store")
        return context.get_dummy_value()

    return sig, codegen

