"""Every numba kernel against a numpy (or torch/transformers) twin.

The twins never call the kernels: linear is "dequantize, then @ in float64", attention is a
plain softmax over the valid slots, RoPE is transformers' rotate_half formula. Tolerances
allow for fastmath's reordered float32 sums and, for the decode kernels, the int16 reading of
activations (checked exactly against its own numpy twin), nothing more.
"""

import math
import re
import zlib

import numpy as np
import pytest
from edgephi.convert.gguf_blocks import planes_from_gguf_blocks
from edgephi.convert.quantize import quantize
from gguf import GGMLQuantizationType as GT
from gguf import quants as gguf_quants
from numba import njit

from edgephi import float16, isa_ops, kernels, matmul
from edgephi.isa import ISAS, choose_isa, runnable_isas
from edgephi.isa_ops import OP_SETS
from edgephi.quant import FORMATS, dequantize
from edgephi.records import activations, linear_from_planes
from tests.kernel_assembly import per_block, row_dot_assembly
from tests.test_quant import GGUF_ONLY, random_gguf_blocks

FORMAT_NAMES = ["f32", "f16", "q4_0", "q4_1", "q8_0"]
GGUF_ONLY_NAMES = sorted(GGUF_ONLY)  # formats that come only from GGUF files: 5-bit and K-quants
GGML = {"q4_0": GT.Q4_0, "q4_1": GT.Q4_1, "q8_0": GT.Q8_0}


HOST = choose_isa()  # what load() picks here (EDGEPHI_ISA may force another)
RUNNABLE = [isa.name for isa in runnable_isas()]  # every instruction set this CPU executes


def ro(a):
    """Read-only contiguous copy, as the weights loader hands weights to the kernels."""
    a = np.ascontiguousarray(a).copy()
    a.setflags(write=False)
    return a


def weight_record(planes, name):
    """quant planes -> the kernels' records.Linear, built as edgephi/weights.py does."""
    return linear_from_planes(name, {plane: ro(a) for plane, a in planes.items()})


def random_matrix(rng, rows, cols):
    """Rows at different scales, so a row-indexing slip shows in the result."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return w * np.exp(rng.uniform(-1.5, 1.5, (rows, 1))).astype(np.float32)


@njit(cache=False)
def _widen_all(bits):
    out = np.empty(bits.shape[0], np.float32)
    for i in range(bits.shape[0]):
        out[i] = float16.f16_to_f32(bits[i])
    return out


def test_f16_to_f32_matches_numpy_for_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = _widen_all(bits)
    finite = ~np.isnan(want)
    assert np.array_equal(got[finite], want[finite])
    assert np.all(np.isnan(got[~finite]))


# ---------------------------------------------------------------------------------------------
# linear


# The activations' largest integer: 127 * 256 + 127, so each splits into two signed bytes (Arm's
# byte dots); int16's own 32767 would not.
ACTIVATION_TOP = 127 * 256 + 127


def quantize_activations_twin(x):
    """numpy's reading of the decode kernels' activation format: blocks of 32 scaled to int16 by
    their largest magnitude (round half to even), the scale, and the block sums of x_hat."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    top = np.float32(ACTIVATION_TOP)
    inv = np.where(amax > 0, top / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.round(blocks * inv[:, None]).astype(np.int16)
    xd = (amax / top).astype(np.float32)
    return xq.reshape(-1), xd, xq.astype(np.float64).sum(axis=1) * xd


def pair_bytes_twin(xq):
    """The byte layout the AVX-512 VNNI q4 dots read: for each full pair of blocks A, B, the int16
    values in the order A 0..15, B 0..15, A 16..31, B 16..31, first their low bytes, then their
    high bytes; an odd last block has none."""
    pairs = xq.size // 64
    order = xq[:pairs * 64].reshape(pairs, 2, 2, 16).transpose(0, 2, 1, 3).reshape(pairs, 64)
    as_bytes = order.astype("<i2").view(np.uint8).reshape(pairs, 64, 2)
    out = np.zeros(2 * xq.size, np.uint8)
    out[:pairs * 128] = np.concatenate([as_bytes[:, :, 0], as_bytes[:, :, 1]], axis=1).reshape(-1)
    return out


def split_bytes_twin(xq):
    """The byte layout Arm's byte dots read: for each block, its values' low bytes as signed
    bytes l in -128..127, then the high bytes h with x = 256 h + l."""
    x = xq.astype(np.int64).reshape(-1, 32)
    low = x - 256 * np.floor_divide(x + 128, 256)
    high = (x - low) // 256
    assert np.all(np.abs(np.concatenate([low, high])) <= 128)
    return np.concatenate([low, high], axis=1).astype(np.int8).view(np.uint8).reshape(-1)


FLOAT_SUM_BUDGET = 1e-5  # fastmath's reordered float32 sums


def int16_reading_bound(W, x):
    """Largest change the decode kernels' int16 reading of x (T, K) can make to x @ W.T: each value
    moves by at most half a step, amax / (2 ACTIVATION_TOP), of its block of 32."""
    step = np.abs(x).reshape(x.shape[0], -1, 32).max(axis=2) / (2.0 * ACTIVATION_TOP)  # (T, K/32)
    w_abs = np.abs(W.astype(np.float64)).reshape(W.shape[0], -1, 32).sum(axis=2)  # (N, K/32)
    return step @ w_abs.T * 1.0001  # (T, N)


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("N,K", [(37, 96), (40, 256), (3, 32), (4, 64)])
def test_linear_matches_dequantize_then_matmul(name, T, N, K):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{T}-{N}-{K}".encode()))
    planes = quantize(random_matrix(rng, N, K), FORMATS[name])
    w = weight_record(planes, name)
    # a nonzero mean makes the per-block sums of x (q4's folded -8 offset and q4_1 minimum) matter
    x = (rng.standard_normal((T, K)) + 0.5).astype(np.float32)
    out = np.full((T, N), np.nan, np.float32)  # the kernel must write every element
    matmul.linear(HOST, w, x, out, activations(8, K), False)

    W = dequantize(planes, FORMATS[name])
    ref = x.astype(np.float64) @ W.astype(np.float64).T
    assert out.shape == ref.shape
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(np.isfinite(out))
    allowed = FLOAT_SUM_BUDGET * np.linalg.norm(ref)
    if name.startswith("q"):
        allowed = allowed + int16_reading_bound(W, x)
    assert np.all(err <= allowed), (err.max(), np.unravel_index(err.argmax(), err.shape))


def test_quantize_activations_matches_twin():
    rng = np.random.default_rng(21)
    x = (rng.standard_normal(256) * np.repeat(np.exp(rng.uniform(-4, 4, 8)), 32)).astype(np.float32)
    x[64:96] = 0.0  # an all-zero block has scale 0, not NaN
    xq, xb, xd, xs = (a[0] for a in activations(1, 256))
    matmul.quantize_activations(HOST, x, xq, xb, xd, xs)
    want_q, want_d, want_s = quantize_activations_twin(x)
    assert np.abs(xq.astype(np.int32) - want_q).max() <= 1  # fastmath may round x * inv one way or the other
    assert np.array_equal(xq[64:96], np.zeros(32, np.int16))
    if OP_SETS[HOST.name].pair_bytes:  # the byte copy only the VNNI q4 dots read
        assert np.array_equal(xb, pair_bytes_twin(xq))
    elif OP_SETS[HOST.name].split_bytes:  # Arm's byte dots
        assert np.array_equal(xb, split_bytes_twin(xq))
    else:
        assert not xb.any()
    assert np.allclose(xd, want_d, rtol=1e-6, atol=0)
    assert np.allclose(xs, want_s, rtol=1e-5, atol=1e-6 * np.abs(x).max())


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("N,K", [(37, 96), (130, 512), (5, 8192)])  # 8192: blocks of 12 tokens (L2-sized)
@pytest.mark.parametrize("T", [1, 7, 30])  # decode; row-dot tiles of four plus single tokens; panels
def test_quantized_linear_is_exact_on_int16_activations(name, N, K, T):
    """Given the int16 activations, the block dots of quantized weights are exact integer work: the
    kernel equals the float64 product of the dequantized weights with the dequantized activations."""
    check_exact_on_int16_activations(HOST, name, N, K, T)


def make_planes(rng, name, N, K):
    """Weights of `name`: quantized by edgephi's converter, or (formats only GGUF files bring)
    random GGUF blocks split as the converter splits them."""
    if FORMATS[name].quantizable:
        return quantize(random_matrix(rng, N, K), FORMATS[name])
    return planes_from_gguf_blocks(random_gguf_blocks(name, N, K, seed=int(rng.integers(1 << 30))), FORMATS[name], N)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k"])
def test_prompt_steps_are_exact_and_the_same_at_any_length(name):
    """A prompt step's sums, at every length (panels even for one token), stay within the
    exactness bound, and a token's are the same bits whether it comes alone or among 30: so a
    prompt split into steps anywhere gives the logits of one cold prefill."""
    N, K = 70, 512
    whole = check_exact_on_int16_activations(HOST, name, N, K, 30, prompt=True)
    rng = np.random.default_rng(zlib.crc32(f"exact-{name}-{N}-{K}-30".encode()))
    w = weight_record(make_planes(rng, name, N, K), name)
    x = (rng.standard_normal((30, K)) * 3 + 1).astype(np.float32)
    for start, stop in ((0, 1), (1, 4), (4, 11), (11, 18), (29, 30)):
        part = np.full((stop - start, N), np.nan, np.float32)
        matmul.linear(HOST, w, x[start:stop], part, activations(stop - start, K), True)
        assert np.array_equal(part.view(np.uint32), whole[start:stop].view(np.uint32)), (start, stop)
    for T in (1, 3):
        check_exact_on_int16_activations(HOST, name, N, K, T, prompt=True)


@pytest.mark.parametrize("name", GGUF_ONLY_NAMES)
@pytest.mark.parametrize("N,K", [(37, 512), (5, 8192)])
@pytest.mark.parametrize("T", [1, 11, 30])
def test_gguf_formats_exact_on_int16_activations(name, N, K, T):
    """The 5-bit and K-quant block dots (K-quants: two super-blocks per 512) held to the same
    exactness as the formats edgephi quantizes to."""
    check_exact_on_int16_activations(HOST, name, N, K, T)


@pytest.mark.parametrize("name", GGUF_ONLY_NAMES)
def test_embed_rows_gguf_formats_are_ggufs_dequantize(name):
    """The jitted block dequantizer (embedding rows, float matmuls) gives gguf's own bits."""
    raw = random_gguf_blocks(name, 9, 512, seed=4)
    planes = planes_from_gguf_blocks(raw, FORMATS[name], 9)
    tokens = np.array([8, 0, 3, 3], np.int64)
    out = np.empty((4, 512), np.float32)
    matmul.embed_rows(weight_record(planes, name), tokens, out)
    theirs = gguf_quants.dequantize(raw, GGUF_ONLY[name]).reshape(9, 512)
    assert np.array_equal(out.view(np.uint32), theirs[tokens].view(np.uint32))


def check_exact_on_int16_activations(isa, name, N, K, T, prompt=False):
    """linear's decode / verify sums (prompt=False) or a prompt step's against the float64 twin;
    returns the output."""
    rng = np.random.default_rng(zlib.crc32(f"exact-{name}-{N}-{K}-{T}".encode()))
    planes = make_planes(rng, name, N, K)
    x = (rng.standard_normal((T, K)) * 3 + 1).astype(np.float32)
    out = np.full((T, N), np.nan, np.float32)
    matmul.linear(isa, weight_record(planes, name), x, out, activations(T, K), prompt)

    W = dequantize(planes, FORMATS[name]).astype(np.float64)
    for t in range(T):
        xq, xd, _ = quantize_activations_twin(x[t])
        x_hat = (xq.reshape(-1, 32).astype(np.float64) * xd[:, None].astype(np.float64)).reshape(-1)
        ref = W @ x_hat
        # float32 accumulation over K/32 block sums: a few ulps of the sum of |terms| per sqrt(block)
        float_sums = 4 * 2.0 ** -24 * np.sqrt(K / 32) * (np.abs(W) @ np.abs(x_hat))
        assert np.all(np.abs(out[t] - ref) <= float_sums), t
    return out


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0"])
def test_linear_twin_is_ggufs_dequantize(name):
    """The twin's dequantize(quantize(w)) is the gguf package's, so the kernels are held to
    the real format, not to edgephi's own reading of it."""
    rng = np.random.default_rng(11)
    w = random_matrix(rng, 37, 96)
    ours = dequantize(quantize(w, FORMATS[name]), FORMATS[name])
    theirs = gguf_quants.dequantize(gguf_quants.quantize(w, GGML[name]), GGML[name])
    assert np.array_equal(ours, theirs.reshape(ours.shape))
    # and the decode (T = 1) kernel against gguf's matrix directly
    x = (rng.standard_normal((1, 96)) + 0.5).astype(np.float32)
    out = np.full((1, 37), np.nan, np.float32)
    matmul.linear(HOST, weight_record(quantize(w, FORMATS[name]), name), x, out, activations(8, 96), False)
    ref = x.astype(np.float64) @ theirs.astype(np.float64).reshape(37, 96).T
    allowed = FLOAT_SUM_BUDGET * np.linalg.norm(ref) + int16_reading_bound(theirs.reshape(37, 96), x)
    assert np.all(np.abs(out - ref) <= allowed)


def test_linear_decode_and_prefill_agree_on_a_row():
    """Row t of a T = 5 product equals the T = 1 product of x[t] (same weights, both paths)."""
    rng = np.random.default_rng(5)
    planes = quantize(random_matrix(rng, 37, 64), FORMATS["q4_0"])
    w = weight_record(planes, "q4_0")
    W = dequantize(planes, FORMATS["q4_0"])
    x = rng.standard_normal((5, 64)).astype(np.float32)
    full = np.zeros((5, 37), np.float32)
    matmul.linear(HOST, w, x, full, activations(8, 64), False)
    for t in range(5):
        one = np.zeros((1, 37), np.float32)
        matmul.linear(HOST, w, np.ascontiguousarray(x[t:t + 1]), one, activations(8, 64), False)
        allowed = 2 * FLOAT_SUM_BUDGET * np.abs(full[t]).max() + int16_reading_bound(W, x[t:t + 1])[0]
        assert np.all(np.abs(one[0] - full[t]) <= allowed)


# ---------------------------------------------------------------------------------------------
# embed_rows


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_embed_rows_is_dequantized_rows(name):
    rng = np.random.default_rng(3)
    V, D = 23, 96
    planes = quantize(random_matrix(rng, V, D), FORMATS[name])
    tokens = np.array([0, 22, 7, 7, 13], np.int64)
    out = np.full((len(tokens), D), np.nan, np.float32)
    matmul.embed_rows(weight_record(planes, name), tokens, out)
    assert np.array_equal(out, dequantize(planes, FORMATS[name])[tokens])


@pytest.mark.parametrize("name", ["f32", "f16"])
def test_embed_rows_float_formats_any_width(name):
    """Float embeddings have no block-of-32 constraint (the converter accepts f16/f32 for any shape)."""
    rng = np.random.default_rng(4)
    planes = quantize(random_matrix(rng, 9, 40), FORMATS[name])
    tokens = np.array([8, 0, 3], np.int64)
    out = np.full((3, 40), np.nan, np.float32)
    matmul.embed_rows(weight_record(planes, name), tokens, out)
    assert np.array_equal(out, dequantize(planes, FORMATS[name])[tokens])


# ---------------------------------------------------------------------------------------------
# elementwise kernels


def test_rmsnorm():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((4, 96)) * [[1], [100], [1e-3], [0]]).astype(np.float32)
    weight = rng.standard_normal(96).astype(np.float32)
    eps = 1e-5
    out = np.full_like(x, np.nan)
    kernels.rmsnorm(x, weight, np.float32(eps), out)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64 ** 2, axis=1, keepdims=True) + eps) * weight
    assert np.allclose(out, ref, rtol=2e-6, atol=1e-6)
    assert np.all(out[3] == 0)


def test_silu_mul():
    rng = np.random.default_rng(7)
    F = 48
    gate_up = (rng.standard_normal((3, 2 * F)) * 4).astype(np.float32)
    gate_up[0, :4] = [-100.0, 100.0, 0.0, -20.0]
    out = np.full((3, F), np.nan, np.float32)
    kernels.silu_mul(gate_up, out)
    g, u = gate_up[:, :F].astype(np.float64), gate_up[:, F:].astype(np.float64)
    ref = g / (1 + np.exp(-g)) * u
    assert np.allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_add_into():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 20)).astype(np.float32)
    y = rng.standard_normal((3, 20)).astype(np.float32)
    want = x + y
    y_before = y.copy()
    kernels.add_into(x, y)
    assert np.array_equal(x, want) and np.array_equal(y, y_before)


# ---------------------------------------------------------------------------------------------
# RoPE


def rope_reference(qkv, positions, inv_freq, attention_factor, H, Hk, Dh, R):
    """transformers' rotate_half RoPE on the first R dims of each q and k head, float64 math on
    the float32 angle (transformers forms position * inv_freq in float32)."""
    T = qkv.shape[0]
    heads = qkv[:, :(H + Hk) * Dh].astype(np.float64).reshape(T, H + Hk, Dh)
    angle = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # (T, R/2)
    emb = np.concatenate([angle, angle], axis=1)[:, None, :]  # (T, 1, R)
    cos, sin = np.cos(emb) * attention_factor, np.sin(emb) * attention_factor
    rot = heads[..., :R]
    half = R // 2
    rotated = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = qkv.astype(np.float64).copy()
    heads = np.concatenate([rot * cos + rotated * sin, heads[..., R:]], axis=-1)
    out[:, :(H + Hk) * Dh] = heads.reshape(T, -1)
    return out


@pytest.mark.parametrize("H,Hk,Dh,R,factor", [(4, 2, 16, 12, 1.19), (2, 2, 8, 8, 1.0), (3, 1, 16, 8, 0.9)])
def test_rope_partial_rotary_and_attention_factor(H, Hk, Dh, R, factor):
    rng = np.random.default_rng(R * 10 + H)
    T = 5
    qkv = rng.standard_normal((T, (H + 2 * Hk) * Dh)).astype(np.float32)
    positions = np.array([0, 1, 7, 300, 4000], np.int64)
    inv_freq = (1.0 / (np.float32(10000.0) ** (np.arange(0, R, 2, dtype=np.float32) / np.float32(R)))
                ).astype(np.float32) / np.linspace(1, 3, R // 2, dtype=np.float32)
    ref = rope_reference(qkv, positions, inv_freq, factor, H, Hk, Dh, R)
    got = qkv.copy()
    kernels.rope(got, positions, inv_freq, np.float32(factor), H, Hk, Dh, R)
    assert np.array_equal(got[:, (H + Hk) * Dh:], qkv[:, (H + Hk) * Dh:])  # v untouched
    for h in range(H + Hk):  # dims past R pass through untouched
        assert np.array_equal(got[:, h * Dh + R:(h + 1) * Dh], qkv[:, h * Dh + R:(h + 1) * Dh])
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-5)

    # the same against transformers' own apply_rotary_pos_emb (torch, float32 cos/sin)
    torch = pytest.importorskip("torch")
    phi3 = pytest.importorskip("transformers.models.phi3.modeling_phi3")
    freqs = torch.from_numpy(positions).float()[:, None] * torch.from_numpy(inv_freq)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[None]  # (1, T, R)
    cos, sin = emb.cos() * factor, emb.sin() * factor
    t = torch.from_numpy(qkv)
    q = t[:, :H * Dh].reshape(T, H, Dh).transpose(0, 1)[None]  # (1, H, T, Dh)
    k = t[:, H * Dh:(H + Hk) * Dh].reshape(T, Hk, Dh).transpose(0, 1)[None]
    q_ref, k_ref = phi3.apply_rotary_pos_emb(q, k, cos, sin)
    assert np.allclose(got[:, :H * Dh], q_ref[0].transpose(0, 1).reshape(T, -1).numpy(), rtol=1e-5, atol=1e-5)
    assert np.allclose(got[:, H * Dh:(H + Hk) * Dh], k_ref[0].transpose(0, 1).reshape(T, -1).numpy(),
                       rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# float32 -> float16 bits


@njit(cache=False)
def _convert_all(floats):
    out = np.empty(floats.shape[0], np.uint16)
    for i in range(floats.shape[0]):
        out[i] = float16.f32_to_f16(floats[i])
    return out


def test_f32_to_f16_matches_numpy():
    rng = np.random.default_rng(9)
    special = np.array([0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e9, -1e9, np.inf, -np.inf,
                        2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -26, 1.5 * 2.0 ** -24,
                        2.5 * 2.0 ** -24, 3.5 * 2.0 ** -24, 2.0 ** -14 - 2.0 ** -25, 1e-45, 3.4e38],
                       np.float32).view(np.uint32)
    # every bit pattern around the half range: exponents 101..144 (subnormal halves to overflow)
    exps = rng.integers(95, 150, 400_000).astype(np.uint32)
    mant = rng.integers(0, 1 << 23, 400_000).astype(np.uint32)
    sign = rng.integers(0, 2, 400_000).astype(np.uint32) << np.uint32(31)
    around = sign | (exps << np.uint32(23)) | mant
    # exact ties: the 13 (or more, for subnormal halves) dropped bits are 1000...0
    tie_mant = (rng.integers(0, 1 << 10, 100_000).astype(np.uint32) << np.uint32(13)) | np.uint32(0x1000)
    ties = (rng.integers(103, 143, 100_000).astype(np.uint32) << np.uint32(23)) | tie_mant
    sub_ties = []
    for e in range(103, 113):  # subnormal halves: 126 - e low bits of the significand are dropped
        shift = 126 - e
        for upper in range(1 << min(23 - shift, 8)):
            sub_ties.append((e << 23) | (upper << shift) | (1 << (shift - 1)))
    anything = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([special, around, ties, np.array(sub_ties, np.uint32), anything])

    with np.errstate(over="ignore"):
        want = bits.view(np.float32).astype(np.float16).view(np.uint16)
    got = _convert_all(bits.view(np.float32))
    nan = np.isnan(bits.view(np.float32))
    assert np.all(np.isnan(got[nan].view(np.float16)))
    assert np.array_equal(got[nan] & 0x8000, want[nan] & 0x8000)  # sign kept (payloads may differ)
    bad = np.nonzero(got[~nan] != want[~nan])[0]
    assert bad.size == 0, [(hex(b), hex(g), hex(w)) for b, g, w in
                           zip(bits[~nan][bad[:5]], got[~nan][bad[:5]], want[~nan][bad[:5]])]


# ---------------------------------------------------------------------------------------------
# KV cache store + attention


def attention_reference(q, k, v, slot_pos, positions, n_slots, window, H, Hk, Dh):
    """Plain softmax attention over the slots a query may see. q (T, H*Dh); k, v (C, Hk*Dh)."""
    T = q.shape[0]
    out = np.zeros((T, H * Dh))
    group = H // Hk
    for t in range(T):
        p = positions[t]
        ok = np.zeros(len(slot_pos), bool)
        ok[:n_slots] = True
        ok &= (slot_pos >= 0) & (slot_pos <= p)
        if window > 0:
            ok &= slot_pos > p - window
        for h in range(H):
            kh = h // group
            qh = q[t, h * Dh:(h + 1) * Dh]
            kk = k[ok, kh * Dh:(kh + 1) * Dh]
            vv = v[ok, kh * Dh:(kh + 1) * Dh]
            s = kk @ qh / math.sqrt(Dh)
            w = np.exp(s - s.max())
            out[t, h * Dh:(h + 1) * Dh] = (w / w.sum()) @ vv
    return out


def torch_sdpa_reference(q, k, v, slot_pos, positions, n_slots, window, H, Hk, Dh):
    torch = pytest.importorskip("torch")
    T, C = q.shape[0], k.shape[0]
    allowed = np.zeros((T, C), bool)
    for t in range(T):
        p = positions[t]
        allowed[t] = (slot_pos >= 0) & (slot_pos <= p) & (np.arange(C) < n_slots)
        if window > 0:
            allowed[t] &= slot_pos > p - window
    qt = torch.from_numpy(q).reshape(T, H, Dh).transpose(0, 1)[None]
    kt = torch.from_numpy(k).reshape(C, Hk, Dh).transpose(0, 1).repeat_interleave(H // Hk, dim=0)[None]
    vt = torch.from_numpy(v).reshape(C, Hk, Dh).transpose(0, 1).repeat_interleave(H // Hk, dim=0)[None]
    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=torch.from_numpy(allowed))
    return o[0].transpose(0, 1).reshape(T, H * Dh).numpy().astype(np.float64)


def no_scales(C):
    """The scales a float KV cache passes: none."""
    return np.zeros((C, 0), np.uint16)


def int8_blocks(Dh):
    """The blocks of 16 an int8 cache scales a head's row by (the last may be shorter)."""
    return [(b, min(b + 16, Dh)) for b in range(0, Dh, 16)]


def int8_candidates(amax):
    """The scales an int8 block may take, as float16: its largest magnitude / 127.5, / 127, ... / 120."""
    return np.stack([(amax / np.float32(127.5 - 0.5 * c)).astype(np.float16) for c in range(16)], axis=-1)


def int8_round(part, scale):
    """part times 1 / scale (both float32, as the cache computes them) rounded half to even into -127..127."""
    inv = np.float32(1.0) / np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    return np.where(scale > 0, np.clip(np.round(part * inv), -127, 127), 0).astype(np.int8)


def int8_rows_twin(x, Hk, Dh):
    """numpy's int8 KV rows: each block of 16 of a head's row at whichever candidate scale
    (int8_candidates) gives the least squared error, in float64, rounded half to even;
    (int8 (C, Hk Dh), float16 bits of the scales (C, Hk * blocks per head))."""
    heads = x.astype(np.float32).reshape(x.shape[0], Hk, Dh)
    q = np.zeros(heads.shape, np.int8)
    scales = []
    for h in range(Hk):
        for b0, b1 in int8_blocks(Dh):
            part = heads[:, h, b0:b1]
            tries = int8_candidates(np.abs(part).max(axis=1)).astype(np.float32)  # (C, 16)
            errs = [int8_block_error(part, tries[:, c]) for c in range(tries.shape[1])]
            scale = tries[np.arange(len(part)), np.argmin(np.stack(errs, axis=1), axis=1)]
            q[:, h, b0:b1] = int8_round(part, scale[:, None])
            scales.append(scale.astype(np.float16).view(np.uint16))
    return q.reshape(x.shape[0], Hk * Dh), np.stack(scales, axis=1)


def int8_block_error(part, scale):
    """Squared error (float64) of each row of blocks `part` rounded at its `scale`; inf for a zero scale."""
    err = ((part - int8_round(part, scale[:, None]).astype(np.float64) * scale[:, None]) ** 2).sum(axis=1)
    return np.where(scale > 0, err, np.inf)


def int8_dequantized(q, scales, Hk, Dh):
    """What an int8 cache holds, in float64: each block's integers times its (float16) scale."""
    heads = q.astype(np.float64).reshape(q.shape[0], Hk, Dh)
    blocks = int8_blocks(Dh)
    for h in range(Hk):
        for i, (b0, b1) in enumerate(blocks):
            heads[:, h, b0:b1] *= scales[:, h * len(blocks) + i, None].view(np.float16).astype(np.float64)
    return heads.reshape(q.shape[0], Hk * Dh)


def check_int8_rows(x, q, scales, Hk, Dh):
    """That int8 rows q with float16 scales hold x: each block's scale is one of its candidates and
    errs least among them (within float32's summing, which may tip a near tie either way), and
    its integers are x / scale rounded."""
    heads, ints = x.astype(np.float32).reshape(len(x), Hk, Dh), q.reshape(len(x), Hk, Dh)
    blocks = int8_blocks(Dh)
    for h in range(Hk):
        for i, (b0, b1) in enumerate(blocks):
            part = heads[:, h, b0:b1]
            scale = scales[:, h * len(blocks) + i].view(np.float16).astype(np.float32)
            tries = int8_candidates(np.abs(part).max(axis=1)).astype(np.float32)
            assert np.all((tries == scale[:, None]).any(axis=1) | (tries.max(axis=1) == 0))
            best = np.min([int8_block_error(part, tries[:, c]) for c in range(tries.shape[1])], axis=0)
            err = np.where(scale > 0, int8_block_error(part, scale), 0.0)
            assert np.all(err <= best * (1 + 1e-5) + 1e-30)
            assert np.array_equal(ints[:, h, b0:b1], int8_round(part, scale[:, None]))


ATTENTION_KERNELS = ("decode", "prompt")  # kernels.attention (decode and verify steps), attention_prompt


def run_attention(kind, qkv, positions, k, v, k_scale, v_scale, slot_pos, n_slots, window, H, Hk, Dh):
    """The attention output of one of the two kernels, its scratch filled with NaN beforehand."""
    C = k.shape[0]
    out = np.full((qkv.shape[0], H * Dh), np.nan, np.float32)
    if kind == "decode":
        scores = np.full((qkv.shape[0] * H, C), np.nan, np.float32)
        kernels.attention(qkv, positions, k, v, k_scale, v_scale, slot_pos, n_slots, window, H, Hk, Dh, scores, out)
    else:
        scores = np.full((kernels.LANE_TOKENS * H, C), np.nan, np.float32)
        lanes = np.full((H, kernels.lane_scratch_floats(Dh)), np.nan, np.float32)
        kernels.attention_prompt(qkv, positions, k, v, k_scale, v_scale, slot_pos, n_slots, window, H, Hk, Dh, scores,
                                 lanes, out)
    return out


@pytest.mark.parametrize("Dh", [32, 40])  # whole blocks of 16, and a short last block
def test_int8_kv_blocks_of_zeros_tiny_and_huge_values(Dh):
    """Blocks a float16 scale cannot hold: zeros and values below 1e-5 give scale 0 and zeros; a
    block past float16's range (scale > 65504) does not come back as finite numbers, as a float16
    cache's would not."""
    H, Hk = 1, 1
    rng = np.random.default_rng(Dh)
    qkv = np.zeros((4, (H + 2 * Hk) * Dh), np.float32)
    k = qkv[:, H * Dh:(H + 1) * Dh]
    k[1] = rng.standard_normal(Dh) * 1e-7  # tiny
    k[2] = rng.standard_normal(Dh) * 1e8  # huge
    k[3] = rng.standard_normal(Dh)
    k[3, :16] = 0.0  # one block of zeros in an ordinary row
    cache, other = np.full((4, Dh), 99, np.int8), np.zeros((4, Dh), np.int8)
    scales, other_scales = np.full((4, -(-Dh // 16)), 7, np.uint16), np.zeros((4, -(-Dh // 16)), np.uint16)
    kernels.store_kv(qkv, np.arange(4, dtype=np.int64), cache, other, scales, other_scales, H, Hk, Dh)
    with np.errstate(invalid="ignore"):  # 0 times an infinite scale
        held = int8_dequantized(cache, scales, Hk, Dh)
    assert np.all(scales[0] == 0) and np.all(cache[0] == 0) and np.all(held[0] == 0)
    assert np.all(scales[1] == 0) and np.all(cache[1] == 0)
    assert not np.isfinite(held[2]).any()
    assert scales[3, 0] == 0 and np.all(cache[3, :16] == 0)
    check_int8_rows(k[3:, 16:], cache[3:, 16:], scales[3:, 1:], Hk, Dh - 16)
    assert np.abs(held[3] - k[3]).max() <= np.abs(k[3]).max() / 200


@pytest.mark.parametrize("kind", ATTENTION_KERNELS)
@pytest.mark.parametrize("kv_dtype", [np.uint16, np.float32, np.int8])
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("H,Hk", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("Dh", [16, 56, 64])  # below, above (by one int8 block and a half) and at the 32-column chunks
def test_store_kv_and_attention(kind, kv_dtype, window, H, Hk, Dh):
    rng = np.random.default_rng(H * 100 + Hk * 10 + window + (kv_dtype == np.uint16) + Dh * 1000)
    C, T = 12, 3
    width = Hk * Dh
    # a ring: slot order is not position order; slots 0-1 a kept prefix, 9 empty, 10-11 beyond n_slots
    slot_pos = np.array([0, 1, 14, 15, 16, 17, 10, 11, 12, -1, -1, -1], np.int64)
    n_slots = 10
    slots = np.array([5, 2, 3], np.int64)  # the new tokens overwrite older positions in the ring
    positions = np.array([17, 18, 19], np.int64)
    slot_pos[slots] = positions  # what KVCache.append does before the kernels run

    old_k = (rng.standard_normal((C, width)) * 2).astype(np.float32)
    old_v = rng.standard_normal((C, width)).astype(np.float32)
    k_scale, v_scale = no_scales(C), no_scales(C)
    if kv_dtype == np.uint16:
        k_cache, v_cache = old_k.astype(np.float16).view(np.uint16), old_v.astype(np.float16).view(np.uint16)
    elif kv_dtype == np.int8:
        (k_cache, k_scale), (v_cache, v_scale) = int8_rows_twin(old_k, Hk, Dh), int8_rows_twin(old_v, Hk, Dh)
    else:
        k_cache, v_cache = old_k.copy(), old_v.copy()
    k_before, v_before = k_cache.copy(), v_cache.copy()
    qkv = (rng.standard_normal((T, (H + 2 * Hk) * Dh)) * 2).astype(np.float32)

    kernels.store_kv(qkv, slots, k_cache, v_cache, k_scale, v_scale, H, Hk, Dh)

    new_k = qkv[:, H * Dh:(H + Hk) * Dh]
    new_v = qkv[:, (H + Hk) * Dh:]
    if kv_dtype == np.uint16:
        want_k, want_v = new_k.astype(np.float16).view(np.uint16), new_v.astype(np.float16).view(np.uint16)
    elif kv_dtype == np.int8:
        for new, cache, scales in ((new_k, k_cache, k_scale), (new_v, v_cache, v_scale)):
            check_int8_rows(new, cache[slots], scales[slots], Hk, Dh)
        want_k, want_v = k_cache[slots], v_cache[slots]
    else:
        want_k, want_v = new_k, new_v
    assert np.array_equal(k_cache[slots], want_k) and np.array_equal(v_cache[slots], want_v)
    others = np.setdiff1d(np.arange(C), slots)
    assert np.array_equal(k_cache[others], k_before[others]) and np.array_equal(v_cache[others], v_before[others])

    # the reference reads what the cache holds: float16-rounded values, or int8 times its row's scale
    if kv_dtype == np.uint16:
        k_ref = k_cache.view(np.float16).astype(np.float64)
        v_ref = v_cache.view(np.float16).astype(np.float64)
    elif kv_dtype == np.int8:
        k_ref, v_ref = int8_dequantized(k_cache, k_scale, Hk, Dh), int8_dequantized(v_cache, v_scale, Hk, Dh)
    else:
        k_ref, v_ref = k_cache.astype(np.float64), v_cache.astype(np.float64)
    q = qkv[:, :H * Dh].astype(np.float64)

    out = run_attention(kind, qkv, positions, k_cache, v_cache, k_scale, v_scale, slot_pos, n_slots, window, H, Hk, Dh)

    ref = attention_reference(q, k_ref, v_ref, slot_pos, positions, n_slots, window, H, Hk, Dh)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-5), np.abs(out - ref).max()
    sdpa = torch_sdpa_reference(q.astype(np.float32), k_ref.astype(np.float32), v_ref.astype(np.float32),
                                slot_pos, positions, n_slots, window, H, Hk, Dh)
    assert np.allclose(out, sdpa, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ATTENTION_KERNELS)
def test_attention_masks_make_a_difference(kind):
    """Sanity of the setup above: the masked-out slots would change the result if attended to."""
    rng = np.random.default_rng(1)
    H, Hk, Dh = 2, 1, 16
    slot_pos = np.array([0, 5, 3, -1], np.int64)
    k = rng.standard_normal((4, Dh)).astype(np.float32)
    v = rng.standard_normal((4, Dh)).astype(np.float32) * 10
    qkv = np.concatenate([rng.standard_normal((1, H * Dh)), k[2:3], v[2:3]], axis=1).astype(np.float32)
    positions = np.array([3], np.int64)
    # position 3 sees slots 0 and 2 (slot 1 holds a later position, slot 3 is empty)
    out = run_attention(kind, qkv, positions, k, v, no_scales(4), no_scales(4), slot_pos, 4, 0, H, Hk, Dh)
    ref = attention_reference(qkv[:, :H * Dh].astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                              slot_pos, positions, 4, 0, H, Hk, Dh)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-5)
    everything = attention_reference(qkv[:, :H * Dh].astype(np.float64), k.astype(np.float64),
                                     v.astype(np.float64), np.array([0, 1, 2, 3]), np.array([9]), 4, 0, H, Hk, Dh)
    assert not np.allclose(out, everything, atol=1e-2)
    # a window of 1 leaves only the query's own slot: the output is exactly its v
    out = run_attention(kind, qkv, positions, k, v, no_scales(4), no_scales(4), slot_pos, 4, 1, H, Hk, Dh)
    assert np.allclose(out.reshape(H, Dh), v[2][None, :], rtol=1e-6, atol=1e-6)


@njit(cache=False)
def _exp_all(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = kernels.exp_nonpositive(x[i])
    return out


def test_exp_nonpositive_matches_numpy():
    x = np.concatenate([-np.logspace(-8, 2, 20001), [0.0, -86.9, -87.1, -np.inf]]).astype(np.float32)
    got = _exp_all(x)
    want = np.exp(x.astype(np.float64))
    live = x > -87
    assert np.all(np.abs(got[live] - want[live]) <= 4e-7 * want[live])
    assert np.all(got[~live] == 0.0)  # masked attention slots must weigh exactly nothing


@pytest.mark.parametrize("kind", ATTENTION_KERNELS)
@pytest.mark.parametrize("Dh", [16, 64])
@pytest.mark.parametrize("window", [0, 3])
def test_attention_over_ordered_slots_skips_later_positions(kind, Dh, window):
    """Before the ring wraps, slot s holds position s: a prefill chunk's tokens see a prefix of the
    slots (the kernel stops there) and never the chunk's later tokens."""
    rng = np.random.default_rng(Dh + window)
    H, Hk, C = 4, 2, 12
    slot_pos = np.full(C, -1, np.int64)
    slot_pos[:10] = np.arange(10)
    positions = np.array([5, 6, 7, 8, 9], np.int64)
    k = (rng.standard_normal((C, Hk * Dh)) * 2).astype(np.float32)
    v = rng.standard_normal((C, Hk * Dh)).astype(np.float32)
    qkv = (rng.standard_normal((5, (H + 2 * Hk) * Dh)) * 2).astype(np.float32)
    out = run_attention(kind, qkv, positions, k, v, no_scales(C), no_scales(C), slot_pos, 10, window, H, Hk, Dh)
    ref = attention_reference(qkv[:, :H * Dh].astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                              slot_pos, positions, 10, window, H, Hk, Dh)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [np.uint16, np.int8])
@pytest.mark.parametrize("H,Hk,Dh,window", [(32, 32, 96, 0), (24, 8, 128, 0), (6, 2, 42, 50)])
def test_prompt_attention_at_real_shapes_and_the_same_for_a_token_at_any_split(kv_dtype, H, Hk, Dh, window):
    """attention_prompt on Phi-3-mini's and Phi-4-mini's heads (and a head dim that leaves rows
    over from the kernel's 4-row tiles) over 140 earlier positions, several tiles of cached rows,
    against float64 and torch's SDPA; and a token's output has the same bits alone, among the
    16 of a full call, or in a shorter call: what prefix reuse needs."""
    rng = np.random.default_rng(H + Dh + window + (kv_dtype == np.int8))
    start, T = 140, 16
    C = start + T + 9  # slots past n_slots stay empty
    slot_pos = np.full(C, -1, np.int64)
    slot_pos[:start + T] = np.arange(start + T)
    positions = np.arange(start, start + T, dtype=np.int64)
    k = (rng.standard_normal((C, Hk * Dh)) * 2).astype(np.float32)
    v = rng.standard_normal((C, Hk * Dh)).astype(np.float32)
    if kv_dtype == np.int8:
        (k_cache, k_scale), (v_cache, v_scale) = int8_rows_twin(k, Hk, Dh), int8_rows_twin(v, Hk, Dh)
        k_ref, v_ref = int8_dequantized(k_cache, k_scale, Hk, Dh), int8_dequantized(v_cache, v_scale, Hk, Dh)
    else:
        k_cache, v_cache = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
        k_scale, v_scale = no_scales(C), no_scales(C)
        k_ref, v_ref = (c.view(np.float16).astype(np.float64) for c in (k_cache, v_cache))
    qkv = rng.standard_normal((T, (H + 2 * Hk) * Dh)).astype(np.float32)
    n_slots = start + T
    out = run_attention("prompt", qkv, positions, k_cache, v_cache, k_scale, v_scale, slot_pos, n_slots, window, H,
                        Hk, Dh)
    q = qkv[:, :H * Dh].astype(np.float64)
    ref = attention_reference(q, k_ref, v_ref, slot_pos, positions, n_slots, window, H, Hk, Dh)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-5), np.abs(out - ref).max()
    for t0, t1 in ((0, 1), (3, 4), (5, 12), (15, 16)):
        part = run_attention("prompt", qkv[t0:t1], positions[t0:t1], k_cache, v_cache, k_scale, v_scale, slot_pos,
                             n_slots, window, H, Hk, Dh)
        assert np.array_equal(part.view(np.uint32), out[t0:t1].view(np.uint32)), (t0, t1)
    sdpa = torch_sdpa_reference(q.astype(np.float32), k_ref.astype(np.float32), v_ref.astype(np.float32),
                                slot_pos, positions, n_slots, window, H, Hk, Dh)  # skips where torch is missing (Arm)
    assert np.allclose(out, sdpa, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", [name for name in RUNNABLE if name != HOST.name])
@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0", *GGUF_ONLY_NAMES])
@pytest.mark.parametrize("N,K", [(37, 96), (130, 512)])
# decode; a row-dot tile and three single tokens; panels; a prompt step's panels with a partial tile
@pytest.mark.parametrize("T,prompt", [(1, False), (7, False), (11, False), (3, True)])
def test_quantized_linear_exact_on_every_isa_the_host_runs(isa, name, N, K, T, prompt):
    """Each other instruction set's block dots, compiled in this process beside the host's (the ISA
    is an argument type), held to the same exactness (the host's runs in the test above)."""
    if K % FORMATS[name].row_multiple:
        K *= 256 // math.gcd(K, 256)  # K-quant rows are whole super-blocks
    check_exact_on_int16_activations(ISAS[isa], name, N, K, T, prompt)


@pytest.mark.parametrize("isa", RUNNABLE)
def test_activation_bytes_only_where_the_isa_reads_them(isa):
    """The pair-order byte copy of the activations is written exactly where the ISA has pair dots,
    and matches the layout's numpy twin there."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(160) * 4).astype(np.float32)  # five blocks: two pairs and an odd one
    xq, xb, xd, xs = (a[0] for a in activations(1, 160))
    matmul.quantize_activations(ISAS[isa], x, xq, xb, xd, xs)
    if OP_SETS[isa].pair_bytes:
        assert np.array_equal(xb, pair_bytes_twin(xq))
        assert np.array_equal(xb, isa_ops.pair_bytes_twin(xq))
    elif OP_SETS[isa].split_bytes:
        assert np.array_equal(xb, split_bytes_twin(xq))
        assert np.array_equal(xb, isa_ops.split_bytes_twin(xq))
    else:
        assert not xb.any()


# what each instruction set's code must contain, compiled for a CPU that has it (any host)
ASSEMBLY_TARGETS = {
    "generic": ("x86_64-unknown-linux-gnu", "ivybridge", "+avx,+f16c", []),
    "avx2": ("x86_64-unknown-linux-gnu", "haswell", "+avx2,+f16c,+fma", ["vpmaddwd .*%ymm"]),
    "avx512": ("x86_64-unknown-linux-gnu", "skylake-avx512", "+avx512f,+avx512bw,+f16c", ["vpmaddwd .*%zmm"]),
    "avx512-vnni": ("x86_64-unknown-linux-gnu", "icelake-server", "+avx512f,+avx512bw,+avx512vnni,+f16c",
                    ["vpdpbusd .*%zmm"]),
    "generic-arm": ("aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod", ["smlal v"]),
    "neon": ("aarch64-unknown-linux-gnu", "cortex-a72", "+neon", ["smlal2? v"]),
    "neon-dotprod": ("aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod", ["sdot v"]),
}


@pytest.mark.parametrize("isa", sorted(ASSEMBLY_TARGETS))
@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0", *GGUF_ONLY_NAMES])
def test_every_isa_compiles_for_its_cpu(isa, name):
    """Every operation set builds valid code for a CPU of its own, whatever the host: the Arm path
    through LLVM's AArch64 backend (llvmlite carries it), the x86 ones for CPUs this one may not be."""
    triple, cpu, features, wanted = ASSEMBLY_TARGETS[isa]
    asm = row_dot_assembly(isa, name, triple, cpu, features).replace("\t", " ")
    for instruction in wanted:
        if instruction.startswith("vpdpbusd") and name in ("q8_0", "q6_k"):
            continue  # no pair dots: q8_0's blocks are whole bytes already, q6_k has two scales a block
        assert re.search(instruction, asm), (isa, name, instruction)
    if triple.startswith("aarch64"):
        assert "%xmm" not in asm and "%ymm" not in asm and "%zmm" not in asm


# Instructions per block of 32 weights in the Arm row dots' main loop, compiled for the ISA's own
# CPU (Cortex-A72 / A76). The bandwidth budget of a Pi 5 is about 10 core cycles a q4_0 block. The
# issue's targets: neon q4_0 <= 30, neon-dotprod q4_0 <= 14 and q8_0 <= 10; q8_0's stops at 12
# (11.75): with exact int16 activations a block takes four sdot, three loads, a fresh accumulator
# and the high bytes' shift, 9 before its share of the pairwise sums, scales and loop.
ARM_INSTRUCTION_LIMITS = {
    ("neon", "q4_0"): 30,
    ("neon", "q8_0"): 30,
    ("neon-dotprod", "q4_0"): 14,
    ("neon-dotprod", "q8_0"): 12,
    ("neon-dotprod", "q4_1"): 15,
    ("neon-dotprod", "q4_k"): 17,
}


@pytest.mark.parametrize("isa,name", sorted(ARM_INSTRUCTION_LIMITS))
def test_arm_row_dots_instructions_per_block(isa, name):
    """The Arm kernels' inner loops stay within their instruction budgets (benchmarks/arm_kernels.py
    prints every format's count and llvm-mca's cycle estimate)."""
    assert per_block(isa, name) <= ARM_INSTRUCTION_LIMITS[isa, name]
