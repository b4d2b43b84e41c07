"""Per-format codecs for the IR row dots: how a block of 32 weights of q4_0, q4_1 or q8_0 is read
from its planes (see quant.py) as integers, its scale, and its offset term.

A block's contribution to a row dot is d * (w . xq) * xd + offset * xs, where xq, xd, xs are the
block's int16 activations, their scale and their sum (quantize_activations), and the offset is
q4_0's -8 d, q4_1's minimum m, or nothing (q8_0).
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir

from .llvm_ir import F32, I8, I16, const, f16_at, lanes, load_vector, splat, vec


@dataclass(frozen=True)
class BlockCodec:
    name: str
    block_bytes: int  # bytes of qs per block of 32
    offset: str  # "none", "minus_8_scales" (q4_0) or "minimum" (q4_1: the m plane)

    @property
    def nibbles(self) -> bool:
        return self.block_bytes == 16

    def weights(self, builder, qbase, row_offset, b):
        """The 32 weights of block b as <32 x i16>, in the order of the block's activations."""
        at = builder.add(row_offset, builder.mul(b, const(self.block_bytes)))
        if not self.nibbles:
            return builder.sext(load_vector(builder, qbase, at, I8, 32, 1), vec(I16, 32))
        packed = load_vector(builder, qbase, at, I8, 16, 1)
        low = builder.and_(packed, splat(I8, 16, 15))  # ggml order: low nibbles are values 0..15
        high = builder.lshr(packed, splat(I8, 16, 4))  # high nibbles are values 16..31
        return builder.zext(builder.shuffle_vector(low, high, lanes(range(32))), vec(I16, 32))

    def pair_nibbles(self, builder, qbase, row_offset, p):
        """The 64 nibbles of blocks 2p and 2p + 1 as <64 x i8> values 0..15, in PAIR_ORDER."""
        packed = load_vector(builder, qbase, builder.add(row_offset, builder.mul(p, const(32))), I8, 32, 1)
        twice = builder.bitcast(builder.shuffle_vector(packed, packed, lanes(list(range(32)) * 2)), vec(I16, 32))
        shifted = builder.lshr(twice, ir.Constant(vec(I16, 32), [0] * 16 + [4] * 16))  # high nibbles down
        return builder.and_(builder.bitcast(shifted, vec(I8, 64)), splat(I8, 64, 15))

    def scale(self, builder, dbase, s_off):
        return f16_at(builder, dbase, s_off)

    def offset_term(self, builder, scale, mbase, s_off):
        """The per-block value each weight is offset by (times the block's activation sum), or None."""
        if self.offset == "minimum":
            return f16_at(builder, mbase, s_off)
        if self.offset == "minus_8_scales":
            return builder.fmul(scale, ir.Constant(F32, -8.0))  # values are q - 8
        return None


CODECS = {c.name: c for c in (
    BlockCodec("q4_0", 16, "minus_8_scales"),
    BlockCodec("q4_1", 16, "minimum"),
    BlockCodec("q8_0", 32, "none"),
)}
