"""The row-dot emitter: one weight row of a quantized matrix dotted with the activations of one
token (decode) or of a tile of TILE_TOKENS tokens (prefill), as explicit-vector LLVM IR built
from a format's codec (block_codecs.py) and an ISA's operation set (isa_ops.py).

numba's own loops over these blocks reach a third of what the core can do: its integer promotion
widens nibbles to int64, and LLVM then reduces every 32-value block to a scalar. Here a block is
one vector expression: weights widened to int16, the block dot to int32 lanes, scaled by the
weights' and activations' scales into a float accumulator that is reduced once per row. With
pair dots (AVX-512 VNNI) q4 blocks go two at a time, and the scales of GROUP_BLOCKS blocks are
converted at once. On x86 the emitted code prefetches the row's bytes PREFETCH_BYTES ahead:
without it, two cores stream weights from memory at 12 GB/s where a plain sum reads 17-20.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .block_codecs import CODECS, BlockCodec, RowPlanes
from .isa_ops import OP_SETS, OpSet, op_set, pair_bytes_load, split_bytes_load
from .llvm_ir import (
    F32,
    FAST,
    I8,
    I16,
    I32,
    I64,
    array_rows,
    broadcast,
    const,
    counted_loop,
    f16_at,
    halves,
    lanes,
    load_vector,
    prefetch as prefetch_ahead,
    reduce_sum,
    splat,
    vec,
)
from .quant import FORMATS

TILE_TOKENS = 4  # tokens per prefill tile: each block of weights is unpacked once for four tokens
PREFETCH_BYTES = 4096
GROUP_BLOCKS = 8  # blocks whose scales are converted at once: a float16 load fills one 8-lane vector


@dataclass
class TokenActivations:
    """Pointers to one token's quantized activations: xq i16*, xb i8*, xd f32*, xs f32*."""

    xq: ir.Value
    xb: ir.Value
    xd: ir.Value
    xs: ir.Value


def _integer_dot(builder, ops: OpSet, w, act: TokenActivations, b):
    """Block b's integer dot of weights w (byte_weights where the ISA has byte dots, else
    weights) with a token's activations, as <acc_lanes x i32>."""
    if ops.byte_dot is not None:
        low, high = split_bytes_load(builder, act.xb, b)
        return ops.byte_dot(builder, w, low, high)
    return ops.block_dot(builder, w, load_vector(builder, act.xq, builder.mul(b, const(32)), I16, 32, 2))


def _block_weights(builder, ops: OpSet, codec: BlockCodec, row, b):
    if ops.byte_dot is not None:
        return codec.byte_weights(builder, row, b, ops.spread_bits)
    return codec.weights(builder, row, b, ops.spread_bits)


def _half_dots(builder, ops: OpSet, w, act: TokenActivations, b):
    """The integer dots of block b's two halves of 16 with a token's activations (q6_k), each as
    <acc_lanes x i32>, on byte dots or half_dot."""
    if ops.byte_dot is not None:
        (w_lo, w_hi), ((l_lo, l_hi), (h_lo, h_hi)) = halves(builder, w), (
            halves(builder, v) for v in split_bytes_load(builder, act.xb, b))
        return ops.byte_dot(builder, w_lo, l_lo, h_lo), ops.byte_dot(builder, w_hi, l_hi, h_hi)
    (w_lo, w_hi), (x_lo, x_hi) = halves(builder, w), halves(
        builder, load_vector(builder, act.xq, builder.mul(b, const(32)), I16, 32, 2))
    return ops.half_dot(builder, w_lo, x_lo), ops.half_dot(builder, w_hi, x_hi)


def _two_scale_term(builder, ops: OpSet, w, act: TokenActivations, b, scales, x_d):
    """q6_k's block: each half's dot times its own scale, as <acc_lanes x float>."""
    lo_scale, hi_scale = (builder.fmul(s, x_d, flags=FAST) for s in scales)
    if ops.byte_dot is not None or ops.half_dot is not None:
        lo, hi = (builder.sitofp(dot, vec(F32, ops.acc_lanes)) for dot in _half_dots(builder, ops, w, act, b))
        return builder.fadd(builder.fmul(lo, broadcast(builder, lo_scale, ops.acc_lanes), flags=FAST),
                            builder.fmul(hi, broadcast(builder, hi_scale, ops.acc_lanes), flags=FAST), flags=FAST)
    half = ops.acc_lanes // 2  # block_dot's first half of lanes is the first half's
    x = load_vector(builder, act.xq, builder.mul(b, const(32)), I16, 32, 2)
    pair = builder.insert_element(builder.insert_element(ir.Constant(vec(F32, 2), ir.Undefined), lo_scale,
                                                         ir.Constant(I32, 0)), hi_scale, ir.Constant(I32, 1))
    spread = builder.shuffle_vector(pair, pair, lanes([0] * half + [1] * half))
    dot = builder.sitofp(ops.block_dot(builder, w, x), vec(F32, ops.acc_lanes))
    return builder.fmul(dot, spread, flags=FAST)


def emit_row_dot(builder, ops: OpSet, codec: BlockCodec, row: RowPlanes, tokens: list[TokenActivations]):
    """Emit the dots of `row` with each token's activations; returns one float32 value per token."""
    n = len(tokens)

    def prefetch(builder, base, offset, ahead):
        if ops.prefetch:
            prefetch_ahead(builder, base, offset, ahead)

    def block(b, carried):
        accs, offsets = carried[:n], carried[n:]
        w = _block_weights(builder, ops, codec, row, b)
        prefetch(builder, row.base["qs"], builder.add(row.row["qs"], builder.mul(b, const(codec.qs_bytes))),
                 PREFETCH_BYTES)
        for plane, per_block in codec.side_planes():
            prefetch(builder, row.base[plane], builder.add(row.row[plane], builder.mul(b, const(per_block))),
                     PREFETCH_BYTES * per_block // codec.qs_bytes)
        d_w = codec.scale(builder, row, b)
        low = None if codec.two_scales else codec.offset_term(builder, d_w, row, b)
        new_accs, new_offsets = [], []
        for i, act in enumerate(tokens):
            x_d = builder.load(builder.gep(act.xd, [b]))
            if codec.two_scales:
                term = _two_scale_term(builder, ops, w, act, b, d_w, x_d)
            else:
                dot = _integer_dot(builder, ops, w, act, b)
                scale = builder.fmul(d_w, x_d, flags=FAST)
                term = builder.fmul(builder.sitofp(dot, vec(F32, ops.acc_lanes)),
                                    broadcast(builder, scale, ops.acc_lanes), flags=FAST)
            new_accs.append(builder.fadd(accs[i], term, flags=FAST))
            if low is None:
                new_offsets.append(offsets[i])
            else:
                x_sum = builder.load(builder.gep(act.xs, [b]))
                new_offsets.append(builder.fadd(offsets[i], builder.fmul(low, x_sum, flags=FAST), flags=FAST))
        return new_accs + new_offsets

    def span(width):
        """The loop body over blocks width * u .. width * u + width - 1, in pairs: their scales and
        offset terms as width-lane vectors, each pair's 16 lanes of scales picked out."""
        lanes_t = vec(F32, width)

        def body(u, carried):
            accs, offsets = carried[:n], carried[n:]
            b0 = builder.mul(u, const(width))
            d_w = codec.scale_lanes(builder, row, b0, width)
            low = codec.offset_lanes(builder, d_w, row, b0, width)
            scales, new_offsets = [], []
            for i, act in enumerate(tokens):
                x_d, x_s = (builder.load(builder.bitcast(builder.gep(p, [b0]), lanes_t.as_pointer()), align=4)
                            for p in (act.xd, act.xs))
                scales.append(builder.fmul(d_w, x_d, flags=FAST))
                new_offsets.append(builder.fadd(offsets[i], builder.fmul(low, x_s, flags=FAST), flags=FAST))
            if width == GROUP_BLOCKS:  # 128 bytes of nibbles, then the small planes
                group_at = builder.add(row.row["qs"], builder.mul(b0, const(16)))
                for line in (PREFETCH_BYTES, PREFETCH_BYTES + 64):
                    prefetch(builder, row.base["qs"], group_at, line)
                for plane, per_block in codec.side_planes():
                    prefetch(builder, row.base[plane], builder.add(row.row[plane], builder.mul(b0, const(per_block))),
                             PREFETCH_BYTES * per_block // 16)
            for k in range(width // 2):
                p = builder.add(builder.mul(u, const(width // 2)), const(k))
                nibbles = codec.pair_nibbles(builder, row, p)
                spread = lanes(([2 * k] * 4 + [2 * k + 1] * 4) * 2)  # PAIR_ORDER's lanes of A and B
                for i, act in enumerate(tokens):
                    low_bytes, high_bytes = pair_bytes_load(builder, act.xb, p)
                    dot = builder.sitofp(ops.pair_dot(builder, nibbles, low_bytes, high_bytes), vec(F32, 16))
                    scale = builder.shuffle_vector(scales[i], scales[i], spread)
                    accs[i] = builder.fadd(accs[i], builder.fmul(dot, scale, flags=FAST), flags=FAST)
            return accs + new_offsets
        return body

    def two_scale_group(u, accs):
        """Eight blocks of a two-scale format (q6_k: one super-block) on 16-lane block dots whose
        first eight lanes are the first half's: the 16 scales are converted at once, and each
        block's pair of them picked out per half."""
        accs = list(accs)
        b0 = builder.mul(u, const(GROUP_BLOCKS))
        d = f16_at(builder, row.base["d"], builder.add(row.row["d"], builder.mul(u, const(2))))
        sc = load_vector(builder, row.base["sc"], builder.add(row.row["sc"], builder.mul(u, const(16))), I8, 16, 1)
        scales = builder.fmul(builder.sitofp(sc, vec(F32, 16)), broadcast(builder, d, 16), flags=FAST)
        group_at = builder.add(row.row["qs"], builder.mul(b0, const(16)))
        for line in (PREFETCH_BYTES, PREFETCH_BYTES + 64):
            prefetch(builder, row.base["qs"], group_at, line)
        prefetch(builder, row.base["qh"], builder.add(row.row["qh"], builder.mul(b0, const(8))), PREFETCH_BYTES // 2)
        per_token = []
        for act in tokens:
            x_d = builder.load(builder.bitcast(builder.gep(act.xd, [b0]), vec(F32, 8).as_pointer()), align=4)
            twice = builder.shuffle_vector(x_d, x_d, lanes([i // 2 for i in range(16)]))
            per_token.append(builder.fmul(scales, twice, flags=FAST))
        for k in range(GROUP_BLOCKS):
            b = builder.add(b0, const(k))
            w = _block_weights(builder, ops, codec, row, b)
            pick = lanes([2 * k] * (ops.acc_lanes // 2) + [2 * k + 1] * (ops.acc_lanes // 2))
            for i, act in enumerate(tokens):
                if ops.grouped:  # a dot per half, each scaled by its own lane
                    for half, dot in enumerate(_half_dots(builder, ops, w, act, b)):
                        scale = builder.shuffle_vector(per_token[i], per_token[i], lanes([2 * k + half] * ops.acc_lanes))
                        dot = builder.sitofp(dot, vec(F32, ops.acc_lanes))
                        accs[i] = builder.fadd(accs[i], builder.fmul(dot, scale, flags=FAST), flags=FAST)
                    continue
                x = load_vector(builder, act.xq, builder.mul(b, const(32)), I16, 32, 2)
                dot = builder.sitofp(ops.block_dot(builder, w, x), vec(F32, ops.acc_lanes))
                scale = builder.shuffle_vector(per_token[i], per_token[i], pick)
                accs[i] = builder.fadd(accs[i], builder.fmul(dot, scale, flags=FAST), flags=FAST)
        return accs

    def group(u, carried):
        """GROUP_BLOCKS blocks of a one-scale format (Arm): their scales (and offset terms) converted
        as vectors at once, and acc_lanes blocks' integer dots summed into one vector's lanes
        (block_sums), then converted and scaled by their lanes of the scales at once. (Groups of 16
        spill registers on Arm: 15.4 instructions a q4_0 block on a Cortex-A76, against 13.9.)"""
        accs, offsets = list(carried[:n]), carried[n:]
        b0 = builder.mul(u, const(GROUP_BLOCKS))
        lanes_t = vec(F32, GROUP_BLOCKS)
        d_w = codec.scale_lanes(builder, row, b0, GROUP_BLOCKS)
        low = None if codec.offset == "none" else codec.offset_base_lanes(builder, d_w, row, b0, GROUP_BLOCKS)
        scales, new_offsets = [], []
        for i, act in enumerate(tokens):
            x_d, x_s = (builder.load(builder.bitcast(builder.gep(p, [b0]), lanes_t.as_pointer()), align=4)
                        for p in (act.xd, act.xs))
            scales.append(builder.fmul(d_w, x_d, flags=FAST))
            new_offsets.append(offsets[i] if low is None else
                               builder.fadd(offsets[i], builder.fmul(low, x_s, flags=FAST), flags=FAST))
        group_at = builder.add(row.row["qs"], builder.mul(b0, const(codec.qs_bytes)))
        for line in range(0, GROUP_BLOCKS * codec.qs_bytes, 64):
            prefetch(builder, row.base["qs"], group_at, PREFETCH_BYTES + line)
        for plane, per_block in codec.side_planes():
            prefetch(builder, row.base[plane], builder.add(row.row[plane], builder.mul(b0, const(per_block))),
                     PREFETCH_BYTES * per_block // codec.qs_bytes)
        for k0 in range(0, GROUP_BLOCKS, ops.acc_lanes):
            dots = [[] for _ in tokens]
            for k in range(k0, k0 + ops.acc_lanes):
                b = builder.add(b0, const(k))
                w = _block_weights(builder, ops, codec, row, b)
                for i, act in enumerate(tokens):
                    dots[i].append(_integer_dot(builder, ops, w, act, b))
            for i in range(n):  # lane k the whole dot of block k0 + k
                dot = builder.sitofp(ops.block_sums(builder, dots[i]), vec(F32, ops.acc_lanes))
                scale = builder.shuffle_vector(scales[i], scales[i], lanes(range(k0, k0 + ops.acc_lanes)))
                accs[i] = builder.fadd(accs[i], builder.fmul(dot, scale, flags=FAST), flags=FAST)
        return accs + new_offsets

    zero_acc = splat(F32, ops.acc_lanes, 0.0)
    loop = loop_kind(ops, codec)
    if loop == "groups":
        count = builder.ashr(row.n_blocks, const(GROUP_BLOCKS.bit_length() - 1))
        carried = counted_loop(builder, count, [zero_acc] * n + [splat(F32, GROUP_BLOCKS, 0.0)] * n, group,
                               f"{codec.name}.group")
        factor = ir.Constant(F32, codec.offset_factor)
        offsets = [builder.fmul(reduce_sum(builder, c), factor, flags=FAST) for c in carried[n:]]
        carried = counted_loop(builder, row.n_blocks, carried[:n] + offsets, block, f"{codec.name}.rowdot",
                               start=builder.shl(count, const(GROUP_BLOCKS.bit_length() - 1)))
    elif loop == "two_scale_groups":
        count = builder.ashr(row.n_blocks, const(3))
        accs = counted_loop(builder, count, [zero_acc] * n, two_scale_group, f"{codec.name}.group")
        carried = counted_loop(builder, row.n_blocks, accs + [ir.Constant(F32, 0.0)] * n, block,
                               f"{codec.name}.rowdot", start=builder.shl(count, const(3)))
    elif loop == "pairs":
        # groups of eight blocks (their scales converted in one go), then pairs, then an odd
        # count's last block on 16-bit words (K-quant rows are whole groups: super-blocks)
        accs, offsets = [zero_acc] * n, [ir.Constant(F32, 0.0)] * n
        start = None
        for width, shift in ((GROUP_BLOCKS, GROUP_BLOCKS.bit_length() - 1), (2, 1)):
            count = builder.ashr(row.n_blocks, const(shift))
            if start is not None:
                start = builder.ashr(start, const(shift))
            carried = counted_loop(builder, count, accs + [splat(F32, width, 0.0)] * n, span(width),
                                   f"{codec.name}.span{width}", start=start)
            accs = carried[:n]
            offsets = [builder.fadd(o, reduce_sum(builder, c), flags=FAST) for o, c in zip(offsets, carried[n:])]
            start = builder.shl(count, const(shift))
        carried = counted_loop(builder, row.n_blocks, accs + offsets, block, f"{codec.name}.rowdot", start=start)
    else:
        carried = counted_loop(builder, row.n_blocks, [zero_acc] * n + [ir.Constant(F32, 0.0)] * n, block,
                               f"{codec.name}.rowdot")
    accs, offsets = carried[:n], carried[n:]
    return [builder.fadd(reduce_sum(builder, accs[i]), offsets[i], flags=FAST) for i in range(n)]


def loop_kind(ops: OpSet, codec: BlockCodec) -> str:
    """Which loop emit_row_dot runs a row in before its tail of single blocks: "groups" (Arm: eight
    blocks' scales at once), "two_scale_groups" (q6_k's super-blocks where the ISA has no
    word half dot, or on Arm), "pairs" (VNNI pair dots) or "blocks" (one at a time)."""
    if ops.grouped and not codec.two_scales:
        return "groups"
    if codec.two_scales and (ops.half_dot is None or ops.grouped):
        return "two_scale_groups"
    if ops.pair_dot is not None and codec.pair_dots:
        return "pairs"
    return "blocks"


def blocks_per_iteration(ops: OpSet, codec: BlockCodec) -> int:
    """Blocks of 32 the main loop of emit_row_dot takes per iteration (for counting instructions)."""
    return 1 if loop_kind(ops, codec) == "blocks" else GROUP_BLOCKS


FORMAT_CASES = [(FORMATS[name].ggml_type, codec) for name, codec in CODECS.items()]
PLANES = ("qs", "d", "m", "qh", "sc")


def _make_row_dot(tile: int):
    """row_dot(isa, w, act, n, t0): row n of the quantized Linear w dotted with tokens t0 .. t0 +
    tile - 1 of the Activations act (see records.py); a float32, or a tuple of `tile` of them.
    The format is w.format at run time: each format's loop is emitted, behind one switch."""

    @intrinsic
    def row_dot(typingctx, isa, w, act, n, t0):
        result = types.float32 if tile == 1 else types.UniTuple(types.float32, tile)
        sig = result(isa, w, act, types.intp, types.intp)
        ops = op_set(isa)

        def codegen(context, builder, signature, args):
            w_type, act_type = signature.args[1], signature.args[2]

            def array(record_type, record, name):
                i = record_type.fields.index(name)
                return context.make_array(record_type.types[i])(context, builder, builder.extract_value(record, i))

            arrays = {p: array(w_type, args[1], p) for p in PLANES}
            row, t0 = args[3], args[4]
            qs_bytes = builder.extract_value(arrays["qs"].shape, 1)  # K/2, or K for q8_0

            def planes(codec):
                return RowPlanes(base={p: builder.bitcast(a.data, I8.as_pointer()) for p, a in arrays.items()},
                                 row={p: builder.mul(row, builder.extract_value(a.strides, 0))
                                      for p, a in arrays.items()},
                                 n_blocks=builder.udiv(qs_bytes, const(codec.qs_bytes)))
            rows = [array_rows(builder, array(act_type, args[2], name), t0, tile, elem)
                    for name, elem in (("xq", I16), ("xb", I8), ("xd", F32), ("xs", F32))]
            tokens = [TokenActivations(*(r[i] for r in rows)) for i in range(tile)]

            fmt = builder.extract_value(args[1], w_type.fields.index("format"))
            cases = [(ggml_type, codec, builder.append_basic_block(f"rowdot.{codec.name}"))
                     for ggml_type, codec in FORMAT_CASES]
            merge = builder.append_basic_block("rowdot.merge")
            switch = builder.switch(fmt, cases[-1][2])  # the last format is the default
            for ggml_type, _, block in cases[:-1]:
                switch.add_case(ir.Constant(fmt.type, ggml_type), block)
            results = []
            for _, codec, block in cases:
                builder.position_at_end(block)
                sums = emit_row_dot(builder, ops, codec, planes(codec), tokens)
                results.append((sums, builder.block))
                builder.branch(merge)
            builder.position_at_end(merge)
            sums = []
            for i in range(tile):
                phi = builder.phi(F32)
                for values, block in results:
                    phi.add_incoming(values[i], block)
                sums.append(phi)
            return sums[0] if tile == 1 else context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return row_dot


row_dot = _make_row_dot(1)
tile_dot = _make_row_dot(TILE_TOKENS)
# a batch of decode steps' remainders (matmul._matmul_batch): each unpacks the row's blocks once
tile_dot2 = _make_row_dot(2)
tile_dot3 = _make_row_dot(3)


def standalone_row_dot(module: ir.Module, isa_name: str, format_name: str, tile: int = 1) -> ir.Function:
    """The same row dot as a plain function of pointers, for compiling to any target's assembly
    (tests count instructions per block for ISAs the host cannot run):
    float rowdot(i8* qs, i8* d, i8* m, i8* qh, i8* sc, i64 n_blocks, i16* xq, i8* xb, float* xd, float* xs)
    over row 0 and tile tokens of one row each (their rows follow at K = 32 n_blocks values)."""
    i8p = I8.as_pointer()
    args = [i8p, i8p, i8p, i8p, i8p, I64, I16.as_pointer(), i8p, F32.as_pointer(), F32.as_pointer()]
    fn = ir.Function(module, ir.FunctionType(F32, args), name=f"rowdot_{isa_name}_{format_name}_{tile}")
    qs, d, m, qh, sc, n_blocks, xq, xb, xd, xs = fn.args
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    k = builder.mul(n_blocks, const(32))
    tokens = [TokenActivations(builder.gep(xq, [builder.mul(k, const(i))]), builder.gep(xb, [builder.mul(k, const(2 * i))]),
                               builder.gep(xd, [builder.mul(n_blocks, const(i))]),
                               builder.gep(xs, [builder.mul(n_blocks, const(i))])) for i in range(tile)]
    row = RowPlanes({"qs": qs, "d": d, "m": m, "qh": qh, "sc": sc}, {p: const(0) for p in PLANES}, n_blocks)
    sums = emit_row_dot(builder, OP_SETS[isa_name], CODECS[format_name], row, tokens)
    total = sums[0]
    for s in sums[1:]:
        total = builder.fadd(total, s)
    builder.ret(total)
    return fn
