"""Quant codecs against the gguf package's reference quantize()/dequantize(), bit for bit."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as ref

from edgephi.convert.gguf_blocks import planes_from_gguf_blocks, planes_to_gguf_blocks
from edgephi.convert.quantize import quantize
from edgephi.quant import FORMATS, dequantize

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

GGML = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0}


def awkward_matrix(rows=48, cols=256, seed=0):
    """Random rows at very different scales plus blocks that stress rounding and zero scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x *= np.exp(rng.uniform(-12, 8, (rows, 1))).astype(np.float32)
    x[0, :32] = 0.0  # zero scale
    x[1, :32] = 3.25  # constant block: max == min
    x[2, :32] = np.arange(32) - 16.0  # exact halves after scaling
    x[3, :32] = -np.arange(32) / 2
    x[4, 32:64] = 1e-30  # subnormal scale once stored as f16
    x[5, :] = 70000.0 * np.sign(x[5, :])  # beyond f16 range
    x[6, :32] = [(-1) ** i * 127 * (i % 3) for i in range(32)]
    return x


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_is_bit_exact_with_gguf(name, seed):
    x = awkward_matrix(seed=seed)
    blocks = ref.quantize(x, GGML[name])
    ours = quantize(x, FORMATS[name])
    assert np.array_equal(planes_to_gguf_blocks(ours, FORMATS[name]), blocks)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0"])
def test_dequantize_and_plane_split_match_gguf(name):
    x = awkward_matrix(seed=7)
    blocks = ref.quantize(x, GGML[name])
    planes = planes_from_gguf_blocks(blocks, FORMATS[name], x.shape[0])
    with np.errstate(invalid="ignore"):
        assert np.array_equal(dequantize(planes, FORMATS[name]), ref.dequantize(blocks, GGML[name]), equal_nan=True)
    assert np.array_equal(planes_to_gguf_blocks(planes, FORMATS[name]), blocks)


@pytest.mark.parametrize("name,bound", [("q4_0", 0.12), ("q4_1", 0.1), ("q8_0", 0.008)])
def test_error_stays_within_the_formats_bound(name, bound):
    """Round-to-nearest error is at most half a step of each block, except q4_0's clipped
    +8 code (the block's extreme of the other sign), which is off by up to one step."""
    x = np.random.default_rng(3).standard_normal((64, 512)).astype(np.float32)
    planes = quantize(x, FORMATS[name])
    back = dequantize(planes, FORMATS[name])
    blocks = x.reshape(-1, 32)
    if name == "q4_1":
        step = (blocks.max(1) - blocks.min(1)) / 15
    else:
        step = np.abs(blocks).max(1) / (8 if name == "q4_0" else 127)
    err = np.abs(back - x).reshape(-1, 32).max(1)
    allowed = step * (1.0 if name == "q4_0" else 0.5)
    assert np.all(err <= allowed + np.abs(blocks).max(1) * 2e-3)  # + f16 rounding of the scale
    assert np.linalg.norm(back - x) / np.linalg.norm(x) < bound


def test_float_formats_round_trip():
    x = awkward_matrix(seed=4)
    assert np.array_equal(dequantize(quantize(x, FORMATS["f32"]), FORMATS["f32"]), x)
    assert np.array_equal(dequantize(quantize(x, FORMATS["f16"]), FORMATS["f16"]),
                          ref.quantize(x, T.F16).astype(np.float32))


GGUF_ONLY = {"q5_0": T.Q5_0, "q5_1": T.Q5_1, "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K}
# byte offsets of each GGUF block's float16 fields (scale, minimum): random bytes there could be NaN
F16_FIELDS = {"q5_0": (0,), "q5_1": (0, 2), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def random_gguf_blocks(name, rows, cols, seed=0):
    """Random bytes as GGUF blocks of `name` (every bit pattern of values, scales and high bits
    occurs), with finite float16 scales."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // fmt.row_multiple * fmt.gguf_block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, fmt.gguf_block_bytes)
    for at in F16_FIELDS[name]:
        scales = (rng.standard_normal(blocks.shape[0]) * np.exp(rng.uniform(-8, 4, blocks.shape[0]))).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw


@pytest.mark.parametrize("name", sorted(GGUF_ONLY))
def test_gguf_only_formats_import_bit_for_bit(name):
    """5-bit and K-quant blocks as GGUF files hold them: split into planes (K-quants rearranged
    into blocks of 32), dequantized to gguf's own float32 bits, and written back unchanged."""
    raw = random_gguf_blocks(name, 24, 1024)
    planes = planes_from_gguf_blocks(raw, FORMATS[name], 24)
    assert np.array_equal(dequantize(planes, FORMATS[name]).view(np.uint32),
                          ref.dequantize(raw, GGUF_ONLY[name]).view(np.uint32))
    assert np.array_equal(planes_to_gguf_blocks(planes, FORMATS[name]), raw)


@pytest.mark.parametrize("name", ["q5_0", "q5_1"])
def test_5_bit_formats_from_ggufs_quantizer(name):
    """The same on gguf's own quantization of awkward values (zero and constant blocks, exact halves)."""
    x = awkward_matrix(seed=5)
    blocks = ref.quantize(x, GGUF_ONLY[name])
    planes = planes_from_gguf_blocks(blocks, FORMATS[name], x.shape[0])
    with np.errstate(invalid="ignore"):
        assert np.array_equal(dequantize(planes, FORMATS[name]), ref.dequantize(blocks, GGUF_ONLY[name]),
                              equal_nan=True)
    assert np.array_equal(planes_to_gguf_blocks(planes, FORMATS[name]), blocks)


@pytest.mark.parametrize("narrow,wide", [("q4_0", "q8_0"), ("q5_0", "q8_0"), ("q4_1", "q5_1"), ("q4_k", "q5_k")])
def test_widening_keeps_every_value(narrow, wide):
    """q/k/v of a llama GGUF mix in different formats are stacked in one that holds them all: the
    widened planes hold gguf's own values of the narrow blocks."""
    from edgephi.convert.tensors import widen

    narrow_type = {**GGML, **GGUF_ONLY}[narrow]
    raw = random_gguf_blocks(narrow, 8, 512, seed=3) if narrow in GGUF_ONLY else \
        ref.quantize(awkward_matrix(8, 512, seed=3), narrow_type)
    planes = planes_from_gguf_blocks(raw, FORMATS[narrow], 8)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(dequantize(widen(planes, FORMATS[narrow], FORMATS[wide]), FORMATS[wide]),
                              ref.dequantize(raw, narrow_type).reshape(8, 512), equal_nan=True)
