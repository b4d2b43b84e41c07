"""Per-ISA operation sets for the quantized block dots: how wide the accumulators are, how 32
int16 weights meet 32 int16 activations, and where an ISA has byte dots (AVX-512 VNNI's vpdpbusd,
Arm's sdot) how weights meet the activations split into bytes, with those byte layouts and
their numpy twins.

Every set computes the same exact integers: |q| <= 128, |x| <= ACTIVATION_MAX and 32 terms fit
int32.
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
# The largest activation integer: 127 * 256 + 127, so that x = 256 h + l with both bytes signed
# (l in -128..127, SPLIT_BYTES below) always fits; int16's 32767 would need h = 128.
ACTIVATION_MAX = 32639
# SPLIT_BYTES, the Arm dot-product layout: block b's 32 values at 64 b as their low bytes l, then
# their high bytes h at 64 b + 32, both signed, x = 256 h + l. Then every format's weights, signed
# (q8_0, q6_k) or not, meet both halves with the same signed byte dot (sdot).
SPLIT_BYTES = 64


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


@njit(cache=True, inline="always")
def split_byte_index(b, j):
    """Where value j of block b goes among SPLIT_BYTES' low bytes; its high byte is 32 further on."""
    return b * SPLIT_BYTES + j


def split_bytes_twin(xq: np.ndarray) -> np.ndarray:
    """numpy twin of the split layout: int16 activations (K,) -> uint8 (2K,), each block's
    signed low bytes (x + 128 mod 256, less 128), then its high bytes (x - low) / 256."""
    x = xq.astype(np.int32).reshape(-1, 32)
    low = (x + 128) % 256 - 128
    high = (x - low) // 256
    return np.concatenate([low, high], axis=1).astype(np.int8).view(np.uint8).reshape(-1)


def _pmaddwd_plain(builder, a, b):
    """<2n x i16> a, b -> <n x i32>: a[2i]*b[2i] + a[2i+1]*b[2i+1], in plain IR."""
    n = a.type.count // 2
    even, odd = lanes(range(0, 2 * n, 2)), lanes(range(1, 2 * n, 2))

    def wide(v, sel):
        return builder.sext(builder.shuffle_vector(v, v, sel), vec(I32, n))
    return builder.add(builder.mul(wide(a, even), wide(b, even)), builder.mul(wide(a, odd), wide(b, odd)))


def _widening_dot_neon(builder, a, b):
    """<4m x i16> a, b -> <4 x i32> whose lanes sum to a . b: widening multiply-accumulates
    (smull, smlal) of whole vectors into two chains, none of pmaddwd's even/odd pairing, which
    only the panels need. smull by its intrinsic: as sext + mul, LLVM folds the widening of q4
    weights from bytes into it and loses the instruction."""
    def part(i):
        """lanes 4i .. 4i + 3, through the register of eight that holds them (smull / smull2)"""
        def pick(v):
            eight = builder.shuffle_vector(v, v, lanes(range(8 * (i // 2), 8 * (i // 2) + 8)))
            return builder.shuffle_vector(eight, eight, lanes(range(4 * (i % 2), 4 * (i % 2) + 4)))
        return call_intrinsic(builder, "llvm.aarch64.neon.smull.v4i32", vec(I32, 4), [pick(a), pick(b)])
    count = a.type.count // 4
    chains = [part(0), part(1)]
    for i in range(2, count):
        chains[i % 2] = builder.add(chains[i % 2], part(i))
    return builder.add(chains[0], chains[1])


def require_feature(builder, feature):
    """Let the function being emitted use `feature` (LLVM's name, "+dotprod") whatever CPU
    numba's LLVM targets: the ISA was chosen from the CPU's HWCAP at load, and emulators
    (qemu-user) report a generic CPU to LLVM."""
    attributes = builder.function.attributes
    text = f'"target-features"="{feature}"'
    if text not in attributes:
        set.add(attributes, text)  # a string attribute, which llvmlite's checked add() does not know


def _sdot(builder, acc, a, b):
    """acc[i] + sum_{j < 4} a[4i + j] * b[4i + j] over <16 x i8>, signed (Arm's dot product)."""
    require_feature(builder, "+dotprod")
    return call_intrinsic(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", vec(I32, 4), [acc, a, b])


def _byte_dot_sdot(builder, w, low, high):
    """<16m x i8> weights (signed, or unsigned below 128) with the activations' low and high
    bytes (SPLIT_BYTES) -> <4 x i32> whose lanes sum to w . (256 high + low): the high bytes'
    dots, shifted by 8, then the low bytes' added. |sum w h| * 256 < 2^31 for 32 terms."""
    count = w.type.count // 16

    def part(v, i):
        return builder.shuffle_vector(v, v, lanes(range(16 * i, 16 * i + 16)))
    acc = splat(I32, 4, 0)
    for i in range(count):
        acc = _sdot(builder, acc, part(w, i), part(high, i))
    acc = builder.shl(acc, splat(I32, 4, 8))
    for i in range(count):
        acc = _sdot(builder, acc, part(w, i), part(low, i))
    return acc


def _block_sums_addp(builder, dots):
    """Four blocks' <4 x i32> dot partials -> <4 x i32> whose lane k is block k's whole dot: two
    rounds of pairwise adds (addp), so that four blocks are converted and scaled by one scvtf and
    one fmla where each alone took both."""
    def addp(a, b):
        return call_intrinsic(builder, "llvm.aarch64.neon.addp.v4i32", vec(I32, 4), [a, b])
    return addp(addp(dots[0], dots[1]), addp(dots[2], dots[3]))


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
    # (builder, w <32 or 16 x i8>, low, high) -> <acc_lanes x i32> summing to the dot with the
    # activations' SPLIT_BYTES: every format's blocks (and q6_k's halves) on byte dots
    byte_dot: Callable | None = None
    # (builder, [acc_lanes dots <acc_lanes x i32>]) -> <acc_lanes x i32>, lane k block k's whole
    # dot: the scales of GROUP_BLOCKS blocks converted at once, and their dots acc_lanes at a time
    # (grouped). None: not grouped
    block_sums: Callable | None = None
    # software prefetch of the row's bytes ahead (row_dot.PREFETCH_BYTES): on x86 it takes two
    # cores from 12 to 17-20 GB/s. Arm cores' stream prefetchers follow a row dot's sequential
    # reads on their own (llama.cpp's NEON row dots prefetch nothing), and there the prfm of each
    # cache line cost 0.4-0.9 instructions a block (q4_0 13.9 against 14.75 on a Cortex-A76)
    prefetch: bool = True
    # the 5- and 6-bit formats' high bits spread to lanes by a byte test (block_codecs._high_bits)
    spread_bits: bool = False
    # the prefill panels' vector of rows (gemm_tile.py) and their pmaddwd-like word pairs
    # (builder, a, b <2 panel_lanes x i16>) -> <panel_lanes x i32>; None: block_dot / half_dot's
    panel_lanes: int | None = None
    word_pairs: Callable | None = None

    @property
    def grouped(self) -> bool:
        return self.block_sums is not None

    @property
    def pair_bytes(self) -> bool:
        """Whether quantize_activations keeps the byte copy the pair dots read."""
        return self.pair_dot is not None

    @property
    def split_bytes(self) -> bool:
        """Whether quantize_activations keeps the SPLIT_BYTES copy the byte dots read."""
        return self.byte_dot is not None


PLAIN = OpSet(8, _split_block_dot(_pmaddwd_plain), half_dot=_pmaddwd_plain)
OP_SETS = {
    "generic": PLAIN,
    "generic-arm": PLAIN,
    # Arm: four-lane accumulators (one 128-bit register), whole-vector widening dots
    "neon": OpSet(4, _widening_dot_neon, half_dot=_widening_dot_neon, block_sums=_block_sums_addp, prefetch=False,
                  spread_bits=True, panel_lanes=8, word_pairs=_pmaddwd_plain),
    "neon-dotprod": OpSet(4, _widening_dot_neon, half_dot=_widening_dot_neon, byte_dot=_byte_dot_sdot,
                          block_sums=_block_sums_addp, prefetch=False, spread_bits=True,
                          panel_lanes=8, word_pairs=_pmaddwd_plain),
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


@overload_attribute(IsaType, "split_bytes")
def _isa_split_bytes(isa):
    """isa.split_bytes in jitted code: a compile-time constant of each ISA."""
    value = op_set(isa).split_bytes
    return lambda isa: value


def split_bytes_load(builder, xb_row, b):
    """The low and high activation bytes (<32 x i8> each) of block b of a row, in SPLIT_BYTES."""
    base = builder.gep(xb_row, [builder.mul(b, const(SPLIT_BYTES))])
    low = builder.load(builder.bitcast(base, vec(I8, 32).as_pointer()), align=1)
    high = builder.load(builder.bitcast(builder.gep(base, [const(32)]), vec(I8, 32).as_pointer()), align=1)
    return low, high


def pair_bytes_load(builder, xb_row, p):
    """The low and high activation bytes (<64 x i8> each) of pair p of a row, in PAIR_ORDER."""
    base = builder.gep(xb_row, [builder.mul(p, const(PAIR_BYTES))])
    low = builder.load(builder.bitcast(base, vec(I8, 64).as_pointer()), align=1)
    high_ptr = builder.gep(base, [const(PAIR_BYTES // 2)])
    return low, builder.load(builder.bitcast(high_ptr, vec(I8, 64).as_pointer()), align=1)

