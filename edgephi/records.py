"""The forward pass's data, as named records numba compiles against (namedtuples of arrays).

A record's fields keep one name from disk to kernel: a quantized matrix's planes are qs, d, m in
weights.safetensors (see quant.py), in Linear, and in the IR row dots. Shapes use the legend of
format.py; every array is C-contiguous.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from numba.core.typing.typeof import typeof_impl

from .isa import Isa
from .quant import FORMATS


def remembers_its_numba_type(cls):
    """Give a record class (a subclass of a NamedTuple, so its instances have a __dict__) a typeof
    that works out an instance's numba type once: numba's own typeof walks every field at every
    call, 0.3 ms for a Transformer, a tenth of a small model's decode step."""
    tuple_typeof = typeof_impl.dispatch(tuple)

    @typeof_impl.register(cls)
    def _typeof(value, context):
        known = value.__dict__.setdefault("_numba_types", {})
        if context.purpose not in known:
            known[context.purpose] = tuple_typeof(value, context)
        return known[context.purpose]
    return cls


class Linear(NamedTuple):
    """A weight matrix W (N, K), applied as out = x @ W.T. Exactly the fields of its format are
    filled; the others are empty (0, 0) arrays, so every Linear has one numba type."""

    format: int  # GGUF's type id, from quant.FORMATS (f32 0, f16 1, q4_0 2, q4_1 3, q8_0 8, q4_k 12, ...)
    qs: np.ndarray  # uint8 (N, K/2) low nibbles, or (N, K) q8_0 int8 bits
    d: np.ndarray  # uint16: float16 bits of the scales, (N, K/32) or (N, K/256) for K-quants
    m: np.ndarray  # uint16: float16 bits of q4_1/q5_1's minimums (N, K/32) or q4_k/q5_k's dmin (N, K/256)
    qh: np.ndarray  # uint8 (N, K/8) 5-bit formats' fifth bits, (N, K/4) q6_k's two high bits
    sc: np.ndarray  # uint8 (N, K/16): K-quants' block scales and minimums (q6_k: int8 bits)
    f16: np.ndarray  # uint16 (N, K): float16 bits of an f16 matrix (numba has no float16)
    f32: np.ndarray  # float32 (N, K): an f32 matrix


class Layer(NamedTuple):
    attn_norm: np.ndarray  # float32 (D,)
    qkv: Linear  # ((H + 2 Hk) Dh, D): q, k and v stacked
    o: Linear  # (D, H Dh)
    ffn_norm: np.ndarray  # float32 (D,)
    gate_up: Linear  # (2F, D): gate, then up
    down: Linear  # (D, F)


class Rope(NamedTuple):
    short: np.ndarray  # float32 (R/2,): inverse frequencies within the original context
    long: np.ndarray  # float32 (R/2,): LongRoPE's beyond it (the same array without LongRoPE)
    attention_factor: np.float32  # LongRoPE's magnitude factor on cos and sin (else 1)
    rotary_dim: int  # R: rotate_half pairing over the first R dims of each head


class TransformerFields(NamedTuple):

    isa: Isa  # the instruction set its kernels compile for (isa.py)
    heads: int  # H
    kv_heads: int  # Hk
    head_dim: int  # Dh
    eps: np.float32  # RMSNorm's epsilon
    window: int  # sliding-window attention span, 0 for none
    rope: Rope
    embed: Linear  # (V, D)
    layers: object  # numba typed.List of Layer (one type for any layer count: no recompile)
    norm: np.ndarray  # float32 (D,)
    output: Linear  # (V, D): the embedding again when tied


@remembers_its_numba_type
class Transformer(TransformerFields):
    """Everything forward() reads of a model: weights (mapped, read-only), sizes, the ISA."""


class KvArrays(NamedTuple):
    """A sequence's KV ring as one step sees it (model.kv_arrays)."""

    k: np.ndarray  # (L, C, Hk Dh): float16 bits (uint16), float32 or int8
    v: np.ndarray  # (L, C, Hk Dh)
    k_scale: np.ndarray  # uint16 (L, C, Hk ceil(Dh / 16)): float16 bits of an int8 cache's block scales; (L, C, 0) otherwise
    v_scale: np.ndarray  # uint16 (L, C, Hk ceil(Dh / 16))
    slot_pos: np.ndarray  # int64 (C,): absolute position each slot holds, -1 if none
    n_slots: int  # slots in use
    long_rope: bool  # keys are rotated with LongRoPE's long factors


class Activations(NamedTuple):
    """A linear's input read as int16 per block of 32 (quantize_activations): the scratch the
    quantized row dots take their activations from, for up to T rows of up to K values."""

    xq: np.ndarray  # int16 (T, K): x_hat = xq * xd per block
    xb: np.ndarray  # uint8 (T, 2K): xq again as bytes in pair order, where the ISA has pair dots
    xd: np.ndarray  # float32 (T, K/32): block scales
    xs: np.ndarray  # float32 (T, K/32): block sums of x_hat


def activations(tokens: int, width: int) -> Activations:
    blocks = (tokens, width // 32)
    return Activations(np.zeros((tokens, width), np.int16), np.zeros((tokens, 2 * width), np.uint8),
                       np.zeros(blocks, np.float32), np.zeros(blocks, np.float32))


class ScratchFields(NamedTuple):

    x: np.ndarray  # float32 (T, D): the residual stream
    xn: np.ndarray  # float32 (T, D): a sublayer's normed input, then its output before the residual add
    qkv: np.ndarray  # float32 (T, (H + 2 Hk) Dh)
    attn: np.ndarray  # float32 (T, H Dh)
    gate_up: np.ndarray  # float32 (T, 2F)
    act: np.ndarray  # float32 (T, F)
    scores: np.ndarray  # float32 (ATTENTION_TOKENS H, C), or (H, C) for T = 1: attention weights
    lanes: np.ndarray  # float32 (H, kernels.lane_scratch_floats(Dh)), or (0, 0) for T = 1: prompt attention's
    quantized: Activations  # (T, max(D, F, H Dh))


@remembers_its_numba_type
class Scratch(ScratchFields):
    """Activations of steps of up to T tokens, reused by every step (forward slices them to the
    step's length)."""


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only plain ndarray view (numba takes no np.memmap): every weight array then has one
    numba type, mapped or not."""
    a = np.asarray(a).view()
    a.setflags(write=False)
    return a


EMPTY_U8 = readonly(np.zeros((0, 0), np.uint8))
EMPTY_U16 = readonly(np.zeros((0, 0), np.uint16))
EMPTY_F32 = readonly(np.zeros((0, 0), np.float32))


def linear_from_planes(format_name: str, planes: dict[str, np.ndarray]) -> Linear:
    """A Linear over a tensor's planes as quant.plane_layout names them ("" for a float matrix),
    as read-only views (mapped weights stay mapped)."""
    fmt = FORMATS[format_name]
    if format_name == "f32":
        return Linear(fmt.ggml_type, EMPTY_U8, EMPTY_U16, EMPTY_U16, EMPTY_U8, EMPTY_U8, EMPTY_U16, readonly(planes[""]))
    if format_name == "f16":
        return Linear(fmt.ggml_type, EMPTY_U8, EMPTY_U16, EMPTY_U16, EMPTY_U8, EMPTY_U8,
                      readonly(planes[""].view(np.uint16)), EMPTY_F32)

    def plane(name, dtype, empty):
        return readonly(planes[name].view(dtype)) if name in planes else empty
    return Linear(fmt.ggml_type, plane("qs", np.uint8, EMPTY_U8), plane("d", np.uint16, EMPTY_U16),
                  plane("m", np.uint16, EMPTY_U16), plane("qh", np.uint8, EMPTY_U8), plane("sc", np.uint8, EMPTY_U8),
                  EMPTY_U16, EMPTY_F32)
