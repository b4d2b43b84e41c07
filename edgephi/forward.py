"""The transformer forward pass as one JIT call per step: every layer, then the final norm and logits.

Phi3 and Llama share it: the converter stores Llama's q/k/v and gate/up stacked like Phi3's
fused qkv_proj and gate_up_proj, and undoes llama.cpp's Q/K permutation.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .kernels import (activation_scratch, add_into, attention, count_nonfinite, embed_rows, linear, rmsnorm, rope,
                      silu_mul, store_kv)

ATTENTION_TOKENS = 16  # tokens per attention call in a prefill chunk: scores are 16 x H x C floats


class Workspace:
    """Scratch arrays for steps of up to T tokens, allocated once and reused every step."""

    def __init__(self, cfg, T: int, capacity: int):
        D, F, Dh, H, Hk = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        f32 = np.float32
        self.T, self.H = T, H
        self.x = np.zeros((T, D), f32)  # residual stream
        self.xn = np.zeros((T, D), f32)  # normed input of a sublayer
        self.qkv = np.zeros((T, (H + 2 * Hk) * Dh), f32)
        self.attn = np.zeros((T, H * Dh), f32)
        self.tmp = np.zeros((T, D), f32)
        self.gate_up = np.zeros((T, 2 * F), f32)
        self.act = np.zeros((T, F), f32)
        self.scores = np.zeros((min(T, ATTENTION_TOKENS) * H, capacity), f32)
        widest = max(D, F, H * Dh)  # the int16 copy of a linear's input (quantized weights)
        self.quantized = activation_scratch(T, widest)
        self._views: dict[int, tuple] = {}

    @staticmethod
    def bytes_per_token(cfg) -> int:
        """Scratch bytes that grow with T (all but the scores): Phi-4-mini's 200 KB."""
        D, F, Dh, H, Hk = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        floats = 3 * D + (H + 2 * Hk) * Dh + H * Dh + 3 * F
        widest = max(D, F, H * Dh)
        return 4 * floats + 4 * widest + 8 * (widest // 32)  # activation_scratch: int16 + 2 bytes + 2 floats a block

    def buffers(self, n: int):
        """Views for a step of n <= T tokens (made once per size: no allocation per step)."""
        if n not in self._views:
            self._views[n] = self._make_views(n)
        return self._views[n]

    def _make_views(self, n: int):
        return (self.x[:n], self.xn[:n], self.qkv[:n], self.attn[:n], self.tmp[:n], self.gate_up[:n],
                self.act[:n], self.scores, self.quantized)


@njit(cache=True)
def forward(tokens, positions, slots, n_slots, shape, eps, inv_freq, attention_factor, window,
            embed, output, final_norm, attn_norms, ffn_norms, qkv_w, o_w, gate_up_w, down_w,
            k_cache, v_cache, slot_pos, x, xn, qkv, attn, tmp, gate_up, act, scores, quantized, logits, all_logits):
    """Run T new tokens (at `positions`, cached into `slots`) through the model; returns how many
    activations entering a linear, and logits, were NaN or Inf (weights that overflow must not
    pass for a reply).
    shape = (H, Hk, Dh, R); k_cache/v_cache (L, C, Hk * Dh) f16 bits or float32; logits (T or 1, V)."""
    H, Hk, Dh, R = shape
    T = tokens.shape[0]
    nonfinite = 0
    embed_rows(embed, tokens, x)
    for layer in range(len(qkv_w)):
        rmsnorm(x, attn_norms[layer], eps, xn)
        nonfinite += linear(qkv_w[layer], xn, qkv, quantized)
        rope(qkv, positions, inv_freq, attention_factor, H, Hk, Dh, R)
        store_kv(qkv, slots, k_cache[layer], v_cache[layer], H, Hk, Dh)
        for t0 in range(0, T, ATTENTION_TOKENS):  # bounds the scores scratch, not the matmul chunk
            t1 = min(T, t0 + ATTENTION_TOKENS)
            attention(qkv[t0:t1], positions[t0:t1], k_cache[layer], v_cache[layer], slot_pos, n_slots, window,
                      H, Hk, Dh, scores, attn[t0:t1])
        nonfinite += linear(o_w[layer], attn, tmp, quantized)
        add_into(x, tmp)
        rmsnorm(x, ffn_norms[layer], eps, xn)
        nonfinite += linear(gate_up_w[layer], xn, gate_up, quantized)
        silu_mul(gate_up, act)
        nonfinite += linear(down_w[layer], act, tmp, quantized)
        add_into(x, tmp)
    if all_logits:
        rmsnorm(x, final_norm, eps, xn)
        nonfinite += linear(output, xn, logits, quantized)
    else:
        rmsnorm(x[T - 1:], final_norm, eps, xn[:1])
        nonfinite += linear(output, xn[:1], logits, quantized)
    return nonfinite + count_nonfinite(logits)
