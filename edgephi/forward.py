"""The transformer forward pass as one JIT call per step: every layer, then the final norm and logits.

Phi3 and Llama share it: the converter stores Llama's q/k/v and gate/up stacked like Phi3's
fused qkv_proj and gate_up_proj, and undoes llama.cpp's Q/K permutation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .attention_lanes import LANE_TOKENS
from .kernels import add_into, attention, attention_prompt, lane_scratch_floats, rmsnorm, rope, silu_mul, store_kv
from .matmul import count_nonfinite, embed_rows, linear, linear_decode
from .records import Scratch, activations

ATTENTION_TOKENS = LANE_TOKENS  # tokens per attention call in a longer step: scores are 16 x H x C floats


def new_scratch(cfg, tokens: int, capacity: int) -> Scratch:
    """Scratch for steps of up to `tokens` tokens over a KV ring of `capacity` slots (prompt steps,
    even of one token, need tokens > 1: attention_prompt's lanes). The attention block's qkv and
    attn and the MLP's gate_up and act are never live at once, so they share one buffer (prefill
    chunks are as long as scratch bytes allow, and panels gain from long ones)."""
    D, F, Dh, H, Hk = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    f32 = np.float32
    Q, A = (H + 2 * Hk) * Dh, H * Dh
    shared = np.zeros(tokens * _shared_floats(cfg), f32)
    return Scratch(
        x=np.zeros((tokens, D), f32), xn=np.zeros((tokens, D), f32),
        qkv=shared[:tokens * Q].reshape(tokens, Q), attn=shared[tokens * Q:tokens * (Q + A)].reshape(tokens, A),
        gate_up=shared[:tokens * 2 * F].reshape(tokens, 2 * F), act=shared[tokens * 2 * F:tokens * 3 * F].reshape(tokens, F),
        scores=np.zeros(((ATTENTION_TOKENS if tokens > 1 else 1) * H, capacity), f32),
        lanes=np.zeros((H, lane_scratch_floats(Dh)) if tokens > 1 else (0, 0), f32),
        quantized=activations(tokens, max(D, F, H * Dh)))


def _shared_floats(cfg) -> int:
    """Floats per token of the buffer qkv + attn and gate_up + act take turns in."""
    F, Dh, H, Hk = cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    return max((H + 2 * Hk) * Dh + H * Dh, 3 * F)


def scratch_bytes_per_token(cfg) -> int:
    """Scratch bytes that grow with the step's tokens (all but the scores and lanes): Phi-4-mini's 158 KB."""
    D, F, Dh, H = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads
    floats = 2 * D + _shared_floats(cfg)
    widest = max(D, F, H * Dh)
    return 4 * floats + 4 * widest + 8 * (widest // 32)  # Activations: int16 + 2 bytes a value, 2 floats a block


@njit(cache=True, nogil=True)
def forward(tokens, positions, slots, model, cache, scratch, logits, prompt):
    """Run T new tokens (at absolute `positions`, cached into ring `slots`) through `model` (a
    records.Transformer), writing logits (T, V) of every token, or (1, V) of the last one. Returns
    how many activations entering a linear, and logits, were NaN or Inf: weights that overflow
    must not pass for a reply. cache: records.KvArrays; scratch: records.Scratch of >= T tokens."""
    T = tokens.shape[0]
    H, Hk, Dh, R = model.heads, model.kv_heads, model.head_dim, model.rope.rotary_dim
    isa, act = model.isa, scratch.quantized
    x, xn, qkv, attn = scratch.x[:T], scratch.xn[:T], scratch.qkv[:T], scratch.attn[:T]
    gate_up, ffn = scratch.gate_up[:T], scratch.act[:T]
    tmp = xn  # a sublayer's output: its normed input is spent by then, and prefill chunks get longer
    inv_freq = model.rope.long if cache.long_rope else model.rope.short
    nonfinite = 0
    embed_rows(model.embed, tokens, x)
    for i in range(len(model.layers)):
        layer = model.layers[i]
        k_cache, v_cache, k_scale, v_scale = cache.k[i], cache.v[i], cache.k_scale[i], cache.v_scale[i]
        rmsnorm(x, layer.attn_norm, model.eps, xn)
        nonfinite += linear(isa, layer.qkv, xn, qkv, act, prompt)
        rope(qkv, positions, inv_freq, model.rope.attention_factor, H, Hk, Dh, R)
        store_kv(qkv, slots, k_cache, v_cache, k_scale, v_scale, H, Hk, Dh)
        for t0 in range(0, T, ATTENTION_TOKENS):  # bounds the scores scratch, not the matmul chunk
            t1 = min(T, t0 + ATTENTION_TOKENS)
            if prompt:  # each cached row read once for the call's tokens, each token's sums split-invariant
                attention_prompt(qkv[t0:t1], positions[t0:t1], k_cache, v_cache, k_scale, v_scale, cache.slot_pos,
                                 cache.n_slots, model.window, H, Hk, Dh, scratch.scores, scratch.lanes, attn[t0:t1])
            else:
                attention(qkv[t0:t1], positions[t0:t1], k_cache, v_cache, k_scale, v_scale, cache.slot_pos,
                          cache.n_slots, model.window, H, Hk, Dh, scratch.scores, attn[t0:t1])
        nonfinite += linear(isa, layer.o, attn, tmp, act, prompt)
        add_into(x, tmp)
        rmsnorm(x, layer.ffn_norm, model.eps, xn)
        nonfinite += linear(isa, layer.gate_up, xn, gate_up, act, prompt)
        silu_mul(gate_up, ffn)
        nonfinite += linear(isa, layer.down, ffn, tmp, act, prompt)
        add_into(x, tmp)
    if logits.shape[0] == T:
        rmsnorm(x, model.norm, model.eps, xn)
        nonfinite += linear(isa, model.output, xn, logits, act, prompt)
    else:
        rmsnorm(x[T - 1:], model.norm, model.eps, xn[:1])
        # one row: the row dots in every kind of step, so a prompt's last logits never depend on its split
        nonfinite += linear(isa, model.output, xn[:1], logits, act, False)
    return nonfinite + count_nonfinite(logits)


@njit(cache=True, nogil=True)
def forward_batch(tokens, positions, slots, model, caches, scratch, logits):
    """One decode step of B sequences at once: tokens[b] at positions[b] into ring slot slots[b] of
    caches[b] (a typed list of records.KvArrays), logits (B, V). The linears read each weight once
    for all B tokens, which is what makes a step of B cost little more than a step of one (decode
    streams the weights from memory); attention reads each sequence's own ring. Row b equals
    forward()'s decode step of tokens[b] alone, bit for bit."""
    B = tokens.shape[0]
    H, Hk, Dh, R = model.heads, model.kv_heads, model.head_dim, model.rope.rotary_dim
    isa, act = model.isa, scratch.quantized
    x, xn, qkv, attn = scratch.x[:B], scratch.xn[:B], scratch.qkv[:B], scratch.attn[:B]
    gate_up, ffn = scratch.gate_up[:B], scratch.act[:B]
    tmp = xn
    nonfinite = 0
    embed_rows(model.embed, tokens, x)
    for i in range(len(model.layers)):
        layer = model.layers[i]
        rmsnorm(x, layer.attn_norm, model.eps, xn)
        nonfinite += linear_decode(isa, layer.qkv, xn, qkv, act)
        for b in range(B):
            cache = caches[b]
            inv_freq = model.rope.long if cache.long_rope else model.rope.short
            one = qkv[b:b + 1]
            rope(one, positions[b:b + 1], inv_freq, model.rope.attention_factor, H, Hk, Dh, R)
            store_kv(one, slots[b:b + 1], cache.k[i], cache.v[i], cache.k_scale[i], cache.v_scale[i], H, Hk, Dh)
            attention(one, positions[b:b + 1], cache.k[i], cache.v[i], cache.k_scale[i], cache.v_scale[i],
                      cache.slot_pos, cache.n_slots, model.window, H, Hk, Dh, scratch.scores, attn[b:b + 1])
        nonfinite += linear_decode(isa, layer.o, attn, tmp, act)
        add_into(x, tmp)
        rmsnorm(x, layer.ffn_norm, model.eps, xn)
        nonfinite += linear_decode(isa, layer.gate_up, xn, gate_up, act)
        silu_mul(gate_up, ffn)
        nonfinite += linear_decode(isa, layer.down, ffn, tmp, act)
        add_into(x, tmp)
    rmsnorm(x, model.norm, model.eps, xn)
    nonfinite += linear_decode(isa, model.output, xn, logits, act)
    return nonfinite + count_nonfinite(logits)
