"""float16 in jitted code: numba has no float16 type, so half values travel as uint16 bits and
convert with LLVM's own instructions (one vcvtph2ps per 8 or 16 values on x86)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def f16_to_f32(typingctx, bits):
    """float16 bits (uint16) -> float32."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_f16(typingctx, value):
    """float32 -> float16 bits, rounding to nearest even (as numpy's astype)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


def widen(value):
    """A KV cache element as float32: the cache holds float16 bits (uint16), float32, or int8
    (to be multiplied by its row's scale)."""


def narrow(value, like):
    """A float32 value in the element type of the float cache `like` (float16 bits or float32)."""


@overload(widen)
def _widen(value):
    if value == types.uint16:
        return lambda value: f16_to_f32(value)
    if value == types.int8:
        return lambda value: np.float32(value)
    return lambda value: value


@overload(narrow)
def _narrow(value, like):
    if like.dtype == types.uint16:
        return lambda value, like: f32_to_f16(value)
    return lambda value, like: value
