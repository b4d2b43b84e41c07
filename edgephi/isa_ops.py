"""Per-ISA operation sets for the quantized block dots: how wide the accumulators are, how 32
int16 weights meet 32 int16 activations, and (AVX-512 VNNI) how a pair of q4 blocks meets the
activations split into bytes, with that byte layout and its numpy twin.

Every set computes the same exact integers: |q| <= 128, |x| <= 32767 and 32 terms fit int32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit
from numba.extending import overload_attribute

from .isa import ISAS, IsaType
from .llvm_ir import I8, I32, call_intrinsic, const, halves, lanes, splat, vec

llvm.initialize_native_asmparser()  # numba's JIT reads inline assembly only with it (_vpdpwssd)

# PAIR_ORDER, the byte order of a pair of q4 blocks A, B (32 packed bytes) once their nibbles are
# spread to 64 bytes: A's values 0..15, B's 0..15, A's 16..31, B's 16..31. Where an ISA has pair
# dots, the activations of each pair of blocks are kept a second time in this order, split into
# bytes: PAIR_BYTES // 2 low bytes (unsigned), then as many high bytes (signed).
PAIR_BYTES = 128


@njit(cache=True, inline="always")
def pair_byte_index(b, j):
    """Where value j of block b (of a full pair) goes among the low bytes of its row; the high
    byte sits PAIR_BYTES // 2 further on."""
    return (b // 2) * PAIR_BYTES + (b % 2) * 16 + (j % 16) + (j // 16) * 32


def pair_bytes_twin(xq: np.ndarray) -> np.ndarray:
    """numpy twin of the byte layout: int16 activations (K,) -> uint8 (2K,), pairs in PAIR_ORDER."""
    out = np.zeros(2 * xq.shape[0], np.uint8)
    n_blocks = xq.shape[0] // 32
    for b in range(n_blocks - n_blocks % 2):
        for j in range(32):
            at = pair_byte_index.py_func(b, j)
            q = int(xq[32 * b + j])
            out[at], out[at + PAIR_BYTES // 2] = q & 255, (q >> 8) & 255
    return out


def _pmaddwd_plain(builder, a, b):
    """<16 x i16> a, b -> <8 x i32>: a[2i]*b[2i] + a[2i+1]*b[2i+1], in plain IR."""
    even, odd = lanes(range(0, 16, 2)), lanes(range(1, 16, 2))

    def wide(v, sel):
        return builder.sext(builder.shuffle_vector(v, v, sel), vec(I32, 8))
    return builder.add(builder.mul(wide(a, even), wide(b, even)), builder.mul(wide(a, odd), wide(b, odd)))


def _pmaddwd_avx2(builder, a, b):
    return call_intrinsic(builder, "llvm.x86.avx2.pmadd.wd", vec(I32, 8), [a, b])


def _split_block_dot(pmaddwd):
    """A block dot of two halves of 16 through an 8-lane pmaddwd."""
    def block_dot(builder, w, x):
        (w_lo, w_hi), (x_lo, x_hi) = halves(builder, w), halves(builder, x)
        return builder.add(pmaddwd(builder, w_lo, x_lo), pmaddwd(builder, w_hi, x_hi))
    return block_dot


def _block_dot_avx512(builder, w, x):
    return call_intrinsic(builder, "llvm.x86.avx512.pmaddw.d.512", vec(I32, 16), [w, x])


def _vpdpbusd(builder, acc, unsigned_bytes, signed_bytes):
    """acc[i] + sum_{j < 4} u[4i + j] * s[4i + j] over <64 x i8> (AVX-512 VNNI), no saturation."""
    v16 = vec(I32, 16)
    return call_intrinsic(builder, "llvm.x86.avx512.vpdpbusd.512", v16,
                          [acc, builder.bitcast(unsigned_bytes, v16), builder.bitcast(signed_bytes, v16)])


def _vpdpwssd(builder, acc, a, b):
    """acc[i] + a[2i] b[2i] + a[2i + 1] b[2i + 1] over <32 x i16> (AVX-512 VNNI), no saturation.
    Inline assembly: LLVM's machine combiner rewrites the intrinsic as vpmaddwd + vpaddd for
    CPUs it does not list as having a fast vpdpwssd, which halved the prefill panels' speed here
    (~110 against ~140-190 GMAC/s)."""
    v16 = vec(I32, 16)
    fnty = ir.FunctionType(v16, [v16, v16, v16])
    return builder.asm(fnty, "vpdpwssd $3, $2, $0", "=v,0,v,v", [acc, builder.bitcast(a, v16), builder.bitcast(b, v16)],
                       side_effect=False)


def _pair_dot_vnni(builder, nibbles, low, high):
    """Exact int32 dot partials of a pair's nibbles <64 x i8> with activations x = 256 h + l given
    as their low and high bytes in PAIR_ORDER, as 16 lanes (lanes 0-3 and 8-11 block A, 4-7 and
    12-15 block B): (sum u h) * 256 + sum l u, two vpdpbusd where words would take four vpmaddwd.
    |sum u h| * 256 < 2^21: no overflow."""
    partial = _vpdpbusd(builder, splat(I32, 16, 0), nibbles, high)
    partial = builder.shl(partial, splat(I32, 16, 8))
    return _vpdpbusd(builder, partial, low, nibbles)


@dataclass(frozen=True)
class OpSet:
    """What the row-dot emitter asks of an ISA."""

    acc_lanes: int  # float accumulator width: one vector register
    block_dot: Callable  # (builder, w <32 x i16>, x <32 x i16>) -> <acc_lanes x i32> partial sums
    pair_dot: Callable | None = None  # (builder, nibbles, low, high) -> <16 x i32>, q4 pairs
    # (builder, w <16 x i16>, x <16 x i16>) -> <acc_lanes x i32>: half a block, where block_dot
    # mixes the halves' lanes (q6_k scales each half apart). None: block_dot's first acc_lanes / 2
    # lanes are the first half's.
    half_dot: Callable | None = None
    # (builder, acc <acc_lanes x i32>, a, b <2 acc_lanes x i16>) -> acc + pair products, one
    # instruction (vpdpwssd) where the ISA has it; None: an add after the word dot
    word_dot_add: Callable | None = None

    @property
    def pair_bytes(self) -> bool:
        """Whether quantize_activations keeps the byte copy the pair dots read."""
        return self.pair_dot is not None


PLAIN = OpSet(8, _split_block_dot(_pmaddwd_plain), half_dot=_pmaddwd_plain)
OP_SETS = {
    "generic": PLAIN,
    "generic-arm": PLAIN,
    "avx2": OpSet(8, _split_block_dot(_pmaddwd_avx2), half_dot=_pmaddwd_avx2),
    "avx512": OpSet(16, _block_dot_avx512),
    "avx512-vnni": OpSet(16, _block_dot_avx512, _pair_dot_vnni, word_dot_add=_vpdpwssd),
}
assert set(OP_SETS) == set(ISAS)


def op_set(isa_type: IsaType) -> OpSet:
    return OP_SETS[isa_type.isa.name]


@overload_attribute(IsaType, "pair_bytes")
def _isa_pair_bytes(isa):
    """isa.pair_bytes in jitted code: a compile-time constant of each ISA."""
    value = op_set(isa).pair_bytes
    return lambda isa: value


def pair_bytes_load(builder, xb_row, p):
    """The low and high activation bytes (<64 x i8> each) of pair p of a row, in PAIR_ORDER."""
    base = builder.gep(xb_row, [builder.mul(p, const(PAIR_BYTES))])
    low = builder.load(builder.bitcast(base, vec(I8, 64).as_pointer()), align=1)
    high_ptr = builder.gep(base, [const(PAIR_BYTES // 2)])
    return low, builder.load(builder.bitcast(high_ptr, vec(I8, 64).as_pointer()), align=1)

