"""Calibration: what each linear layer's inputs look like on real text, for quantizing by importance.

The source model runs in float32 (numpy) on the text's chunks, layer by layer: every chunk's hidden
states pass one layer before the next layer's weights are read, so only one layer's float weights
and the chunks' hidden states are in memory at a time. For each linear weight matrix it collects,
per input column j, the sum over tokens of x_j^2, the statistic llama.cpp's imatrix tool collects
(its "in_sum2", with the token count as "counts"): a column's importance is its mean square input,
since a weight error e_j costs e_j^2 * E[x_j^2] in the layer's output, to first order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgephi.format import ModelConfig, layer_tensor
from edgephi.rope import inverse_frequencies

from .tensors import SourceTensor

CALIBRATION_CTX = 512  # tokens per chunk, llama.cpp imatrix's default
CALIBRATION_CHUNKS = 64  # at most: 32k tokens
ATTENTION_ROWS = 128  # queries per attention block: bounds the score matrix to H x 128 x ctx


@dataclass
class ActivationStats:
    """sum_x2[name]: float64 (in_features,) sums of squared inputs of linear `name` over `tokens` tokens."""
    sum_x2: dict[str, np.ndarray]
    tokens: int

    def importance(self, name: str) -> np.ndarray | None:
        """Mean squared input per column of linear `name` (None when it was not seen)."""
        s = self.sum_x2.get(name)
        return None if s is None else (s / max(self.tokens, 1)).astype(np.float32)


def calibration_chunks(ids: list[int], bos: int | None, ctx: int = CALIBRATION_CTX,
                       chunks: int = CALIBRATION_CHUNKS) -> np.ndarray:
    """(n, ctx) int64 non-overlapping chunks of a tokenized text, each starting with BOS where the
    vocabulary adds one (as llama.cpp's imatrix does); a text shorter than one chunk is one chunk."""
    if bos is not None:
        ids = [bos] + list(ids)
    n = min(chunks, len(ids) // ctx)
    if n == 0:
        return np.asarray(ids, np.int64)[None]
    out = np.asarray(ids[:n * ctx], np.int64).reshape(n, ctx)
    if bos is not None:
        out[:, 0] = bos
    return out


def _rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * weight


def _rope_tables(cfg: ModelConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (length, R) for positions 0..length-1, with the LongRoPE factors transformers picks
    for a sequence of this length."""
    factors, scale = None, 1.0
    if cfg.rope_scaling is not None:
        long = length > cfg.original_max_position_embeddings
        factors = cfg.rope_scaling.long_factor if long else cfg.rope_scaling.short_factor
        scale = cfg.rope_scaling.attention_factor
    inv = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, factors)
    angles = np.arange(length, dtype=np.float32)[:, None] * inv[None]
    angles = np.concatenate([angles, angles], axis=1)
    return (np.cos(angles) * np.float32(scale)).astype(np.float32), \
        (np.sin(angles) * np.float32(scale)).astype(np.float32)


def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rotary: int) -> np.ndarray:
    """x (T, heads, Dh): rotate_half over the first `rotary` dims of each head."""
    half = rotary // 2
    r = x[..., :rotary]
    rotated = np.concatenate([-r[..., half:], r[..., :half]], axis=-1)
    out = x.copy()
    out[..., :rotary] = r * cos[:, None] + rotated * sin[:, None]
    return out


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None) -> np.ndarray:
    """Causal (optionally sliding-window) attention. q (T, H, Dh), k/v (T, Hk, Dh) -> (T, H * Dh)."""
    T, H, Dh = q.shape
    group = H // k.shape[1]
    k = np.repeat(k, group, axis=1).transpose(1, 2, 0)  # (H, Dh, T)
    v = np.repeat(v, group, axis=1).transpose(1, 0, 2)  # (H, T, Dh)
    out = np.empty((T, H, Dh), np.float32)
    keys = np.arange(T)
    for start in range(0, T, ATTENTION_ROWS):
        rows = np.arange(start, min(T, start + ATTENTION_ROWS))
        scores = q[rows].transpose(1, 0, 2) @ k / np.float32(np.sqrt(Dh))  # (H, rows, T)
        hidden = keys[None] > rows[:, None]
        if window is not None:
            hidden |= keys[None] <= rows[:, None] - window
        scores[:, hidden] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[rows] = (p @ v).transpose(1, 0, 2)
    return out.reshape(T, H * Dh)


def _embed_rows(embed: SourceTensor, ids: np.ndarray) -> np.ndarray:
    """float32 embedding rows of `ids` (any shape), reading the table a block of rows at a time."""
    out = np.empty(ids.shape + (embed.shape[1],), np.float32)
    step = max(1, (16 << 20) // embed.shape[1])
    for start in range(0, embed.shape[0], step):
        hit = (ids >= start) & (ids < start + step)
        if hit.any():
            out[hit] = embed.floats(start, min(start + step, embed.shape[0]))[ids[hit] - start]
    return out


def activation_stats(cfg: ModelConfig, tensors: dict[str, SourceTensor], chunks: np.ndarray,
                     progress: Callable[[int, int, str], None] | None = None) -> ActivationStats:
    """Run the source model in float32 over `chunks` ((n, ctx) token ids), each in a fresh context,
    and sum the squares of every linear layer's inputs (output included)."""

    def weight(name: str) -> np.ndarray:
        t = tensors[name]
        return t.floats(0, t.shape[0]).astype(np.float32, copy=False)

    n, T = chunks.shape
    hidden = _embed_rows(tensors["embed"], chunks)
    cos, sin = _rope_tables(cfg, T)
    Q, KV = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sums: dict[str, np.ndarray] = {}

    def collect(name: str, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        s = np.einsum("tj,tj->j", x, x)
        sums[name] = sums.get(name, 0) + s

    for layer in range(cfg.num_layers):
        w = {kind: weight(layer_tensor(layer, kind)) for kind in ("attn_norm", "qkv", "o", "ffn_norm", "gate_up",
                                                                   "down")}
        for c in range(n):
            x = hidden[c]
            xn = _rmsnorm(x, w["attn_norm"], cfg.rms_norm_eps)
            collect(layer_tensor(layer, "qkv"), xn)
            qkv = xn @ w["qkv"].T
            q = qkv[:, :Q].reshape(T, cfg.num_heads, cfg.head_dim)
            k = qkv[:, Q:Q + KV].reshape(T, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, Q + KV:].reshape(T, cfg.num_kv_heads, cfg.head_dim)
            q, k = (_apply_rope(a, cos, sin, cfg.rotary_dim) for a in (q, k))
            a = _attention(q, k, v, cfg.sliding_window)
            collect(layer_tensor(layer, "o"), a)
            x = x + a @ w["o"].T
            xn = _rmsnorm(x, w["ffn_norm"], cfg.rms_norm_eps)
            collect(layer_tensor(layer, "gate_up"), xn)
            gate, up = np.split(xn @ w["gate_up"].T, 2, axis=-1)
            act = gate / (np.float32(1) + np.exp(-gate)) * up
            collect(layer_tensor(layer, "down"), act)
            hidden[c] = x + act @ w["down"].T
        if progress:
            progress(layer + 1, cfg.num_layers, f"calibrating layer {layer}")
    norm = weight("norm")
    for c in range(n):
        collect("output", _rmsnorm(hidden[c], norm, cfg.rms_norm_eps))
    if cfg.tie_word_embeddings or "output" not in tensors:
        sums["embed"] = sums["output"]
    return ActivationStats(sums, n * T)
