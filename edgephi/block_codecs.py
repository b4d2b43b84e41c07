"""Per-format codecs for the IR row dots: how a block of 32 weights is read from its planes (see
quant.py) as integers, its scale(s), and its offset term.

A block's contribution to a row dot is scale * (w . xq) * xd + offset * xs, where xq, xd, xs are
the block's int16 activations, their scale and their sum (quantize_activations); the offset is
-8 d (q4_0), -16 d (q5_0), the minimum m (q4_1, q5_1), -dmin mn (q4_k, q5_k) or nothing. q6_k
has no offset (its weights are signed) but two scales, one per half block of 16.
K-quant scales d * sc are exact in float32 (an 11-bit by 6- or 8-bit product), as in gguf.
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from .llvm_ir import F32, I1, I8, I16, I32, broadcast, const, f16_at, lanes, lanes_at, load_vector, splat, vec


@dataclass
class RowPlanes:
    """Where row n of a quantized matrix lies: each plane's base pointer (i8*) and the byte offset
    of the row in it."""

    base: dict  # plane name -> i8*
    row: dict  # plane name -> i64 byte offset of row n
    n_blocks: ir.Value  # blocks of 32 in a row

    def at(self, builder, plane, offset):
        """i8* to byte `offset` (i64) of this row in `plane`."""
        return builder.gep(self.base[plane], [builder.add(self.row[plane], offset)])


@dataclass(frozen=True)
class BlockCodec:
    name: str
    qs_bytes: int  # bytes of qs per block of 32: 16 (nibbles) or 32 (q8_0)
    high_words: int  # uint32 bit masks per block in qh: 0, 1 (bit 4) or 2 (bits 4 and 5: q6_k)
    scales: str  # "block" (a float16 d per block) or "super" (d per 256 times a byte per block or half)
    offset: str  # "none", "centre" (-centre * scale), "minimum" (m per block), "super_minimum" (-dmin mn)
    centre: int = 0  # q4_0 8, q5_0 16; q6_k's 32 is taken off its weights

    @property
    def nibbles(self) -> bool:
        return self.qs_bytes == 16

    @property
    def two_scales(self) -> bool:
        """One scale per half block of 16 values (q6_k)."""
        return self.high_words == 2

    @property
    def pair_dots(self) -> bool:
        """Whether the VNNI pair dots can take this format: unsigned weights below 32 and one scale
        per block."""
        return self.nibbles and not self.two_scales

    def _high_bits(self, builder, row, b, word, shift, spread=False):
        """<32 x i8>: bit `shift` (4 or 5) of each of block b's values, from qh word `word`.
        As a bitcast of the word to 32 booleans (a mask register on AVX-512), or `spread`: each
        of its four bytes copied to eight lanes and tested against that lane's bit, which Arm
        does in a few whole-vector instructions where the bitcast becomes one per lane."""
        at = builder.mul(b, const(4 * self.high_words))
        ptr = row.at(builder, "qh", builder.add(at, const(4 * word)))
        if spread:
            four = builder.load(builder.bitcast(ptr, vec(I8, 4).as_pointer()), align=1)
            copies = builder.shuffle_vector(four, four, lanes([i // 8 for i in range(32)]))
            bit = ir.Constant(vec(I8, 32), [1 << (i % 8) for i in range(32)])
            test = builder.icmp_unsigned("!=", builder.and_(copies, bit), splat(I8, 32, 0))  # cmtst
            return builder.and_(builder.sext(test, vec(I8, 32)), splat(I8, 32, 1 << shift))
        mask = builder.load(builder.bitcast(ptr, I32.as_pointer()), align=1)
        bits = builder.zext(builder.bitcast(mask, vec(I1, 32)), vec(I8, 32))
        return builder.shl(bits, splat(I8, 32, shift))

    def values(self, builder, row, b, spread=False):
        """Block b's 32 values as <32 x i8> in order: unsigned, before any centre is taken off
        (`spread`: see _high_bits)."""
        at = builder.mul(b, const(self.qs_bytes))
        if not self.nibbles:
            return load_vector(builder, row.base["qs"], builder.add(row.row["qs"], at), I8, 32, 1)
        packed = load_vector(builder, row.base["qs"], builder.add(row.row["qs"], at), I8, 16, 1)
        low = builder.and_(packed, splat(I8, 16, 15))  # ggml order: low nibbles are values 0..15
        high = builder.lshr(packed, splat(I8, 16, 4))  # high nibbles are values 16..31
        q = builder.shuffle_vector(low, high, lanes(range(32)))
        for word in range(self.high_words):
            q = builder.or_(q, self._high_bits(builder, row, b, word, 4 + word, spread))
        return q

    def weights(self, builder, row, b, spread=False):
        """The 32 weights of block b as <32 x i16>, in the order of the block's activations."""
        q = self.values(builder, row, b, spread)
        if not self.nibbles:
            return builder.sext(q, vec(I16, 32))
        w = builder.zext(q, vec(I16, 32))
        if self.two_scales:
            w = builder.sub(w, splat(I16, 32, 32))
        return w

    def byte_weights(self, builder, row, b, spread=False):
        """The 32 weights of block b as <32 x i8> for byte dots: the values (q8_0's signed, the
        others' below 32 before their centre or minimum), q6_k's with its 32 taken off."""
        q = self.values(builder, row, b, spread)
        return builder.sub(q, splat(I8, 32, 32)) if self.two_scales else q

    def pair_nibbles(self, builder, row, p):
        """The 64 values of blocks 2p and 2p + 1 as <64 x i8> (below 32), in PAIR_ORDER."""
        at = builder.add(row.row["qs"], builder.mul(p, const(32)))
        packed = load_vector(builder, row.base["qs"], at, I8, 32, 1)
        twice = builder.bitcast(builder.shuffle_vector(packed, packed, lanes(list(range(32)) * 2)), vec(I16, 32))
        shifted = builder.lshr(twice, ir.Constant(vec(I16, 32), [0] * 16 + [4] * 16))  # high nibbles down
        q = builder.and_(builder.bitcast(shifted, vec(I8, 64)), splat(I8, 64, 15))
        if self.high_words:
            b = builder.mul(p, const(2))
            a_bits = self._high_bits(builder, row, b, 0, 4)
            b_bits = self._high_bits(builder, row, builder.add(b, const(1)), 0, 4)
            order = [*range(16), *range(32, 48), *range(16, 32), *range(48, 64)]  # PAIR_ORDER
            q = builder.or_(q, builder.shuffle_vector(a_bits, b_bits, lanes(order)))
        return q

    def _super_parts(self, builder, row, b, count, plane):
        """Blocks b .. b + count - 1 (in one super-block): the super-block's `plane` (d for the
        scales, m for the minimums) times their bytes in sc (scales first, then minimums), as
        <count x float> (count 1: a float)."""
        u = builder.lshr(b, const(3))
        d = f16_at(builder, row.base[plane], builder.add(row.row[plane], builder.mul(u, const(2))))
        first = 0 if plane == "d" else 8
        at = builder.add(builder.mul(u, const(16)), builder.add(builder.and_(b, const(7)), const(first)))
        ptr = row.at(builder, "sc", at)
        if count == 1:
            return builder.fmul(d, builder.uitofp(builder.load(ptr), F32))
        byte = builder.load(builder.bitcast(ptr, vec(I8, count).as_pointer()), align=1)
        return builder.fmul(broadcast(builder, d, count), builder.uitofp(byte, vec(F32, count)))

    def scale(self, builder, row, b):
        """Block b's scale as a float (q6_k: a pair of floats, one per half)."""
        if self.scales == "block":
            return f16_at(builder, row.base["d"], builder.add(row.row["d"], builder.mul(b, const(2))))
        if not self.two_scales:
            return self._super_parts(builder, row, b, 1, "d")
        u = builder.lshr(b, const(3))
        d = f16_at(builder, row.base["d"], builder.add(row.row["d"], builder.mul(u, const(2))))
        ptr = row.at(builder, "sc", builder.mul(b, const(2)))
        pair = builder.sitofp(builder.load(builder.bitcast(ptr, vec(I8, 2).as_pointer()), align=1), vec(F32, 2))
        return tuple(builder.fmul(d, builder.extract_element(pair, ir.Constant(I32, i))) for i in range(2))

    def scale_lanes(self, builder, row, b0, width):
        """The scales of blocks b0 .. b0 + width - 1 as <width x float> (one-scale formats)."""
        if self.scales == "block":
            return lanes_at(builder, row.base["d"], builder.add(row.row["d"], builder.mul(b0, const(2))), True, width)
        return self._super_parts(builder, row, b0, width, "d")

    def offset_term(self, builder, scale, row, b):
        """The value each weight of block b is offset by (times the block's activation sum), or None."""
        if self.offset == "minimum":
            return f16_at(builder, row.base["m"], builder.add(row.row["m"], builder.mul(b, const(2))))
        if self.offset == "centre":
            return builder.fmul(scale, ir.Constant(F32, -float(self.centre)))
        if self.offset == "super_minimum":
            return builder.fneg(self._super_parts(builder, row, b, 1, "m"))
        return None

    def offset_lanes(self, builder, scales, row, b0, width):
        """offset_term of blocks b0 .. b0 + width - 1 as <width x float>."""
        if self.offset == "minimum":
            return lanes_at(builder, row.base["m"], builder.add(row.row["m"], builder.mul(b0, const(2))), True, width)
        if self.offset == "centre":
            return builder.fmul(scales, splat(F32, width, -float(self.centre)))
        return builder.fneg(self._super_parts(builder, row, b0, width, "m"))

    def offset_base_lanes(self, builder, scales, row, b0, width):
        """offset_lanes of blocks b0 .. b0 + width - 1 without its constant factor (offset_factor):
        d itself for a centre, so that a loop sums d xs and multiplies by -centre once at its end."""
        if self.offset == "minimum":
            return lanes_at(builder, row.base["m"], builder.add(row.row["m"], builder.mul(b0, const(2))), True, width)
        if self.offset == "centre":
            return scales
        return self._super_parts(builder, row, b0, width, "m")

    @property
    def offset_factor(self) -> float:
        return {"centre": -float(self.centre), "super_minimum": -1.0}.get(self.offset, 1.0)

    def side_planes(self) -> list[tuple[str, int]]:
        """The planes besides qs a row dot streams, with their bytes per block (for prefetching;
        the K-quants' super-block scales are a byte per 128 and ride along)."""
        planes = [("d", 2)] if self.scales == "block" else [("sc", 2)]
        if self.offset == "minimum":
            planes.append(("m", 2))
        if self.high_words:
            planes.append(("qh", 4 * self.high_words))
        return planes


CODECS = {c.name: c for c in (
    BlockCodec("q4_0", 16, 0, "block", "centre", 8),
    BlockCodec("q4_1", 16, 0, "block", "minimum"),
    BlockCodec("q8_0", 32, 0, "block", "none"),
    BlockCodec("q5_0", 16, 1, "block", "centre", 16),
    BlockCodec("q5_1", 16, 1, "block", "minimum"),
    BlockCodec("q4_k", 16, 0, "super", "super_minimum"),
    BlockCodec("q5_k", 16, 1, "super", "super_minimum"),
    BlockCodec("q6_k", 16, 2, "super", "none"),
)}
