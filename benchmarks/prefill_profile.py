"""Where a prefill chunk's time goes: each kernel of the forward pass timed on its own with the
chunk's shapes (every layer's share: one layer's time times the layer count), beside the whole step.

    python benchmarks/prefill_profile.py MODEL_DIR [--positions 0,448] [--repeat 5]

A chunk of the model's prefill length is fed at each position, after a prompt of random tokens that
fills the cache up to it, so attention sees as many cached rows as in a long prompt. The parts are
the minimum of --repeat runs; they need not add up to the step exactly (caches are warmer when a
kernel runs alone).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgephi.forward import ATTENTION_TOKENS
from edgephi.kernels import add_into, attention_prompt, rmsnorm, rope, silu_mul, store_kv
from edgephi.matmul import linear
from edgephi.model import NumbaBackend, kv_arrays


def fastest(run, repeat):
    run()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def profile(backend, start, repeat):
    cfg, model = backend.config, backend.transformer
    T = backend.prefill_chunk
    cache = backend.new_cache(start + T + 1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, start + T).astype(np.int64)
    if start:
        backend.feed(cache, tokens[:start], False)
    scratch = backend._scratch_for(T, cache.capacity)
    layer = model.layers[0]
    x, xn, qkv, attn = scratch.x[:T], scratch.xn[:T], scratch.qkv[:T], scratch.attn[:T]
    gate_up, act = scratch.gate_up[:T], scratch.act[:T]
    x[:] = rng.standard_normal(x.shape)
    xn[:] = x
    qkv[:] = rng.standard_normal(qkv.shape) * 0.1
    gate_up[:] = rng.standard_normal(gate_up.shape)
    H, Hk, Dh, R = model.heads, model.kv_heads, model.head_dim, model.rope.rotary_dim
    positions = np.arange(start, start + T, dtype=np.int64)
    kv = kv_arrays(cache)
    k, v, k_scale, v_scale = kv.k[0], kv.v[0], kv.k_scale[0], kv.v_scale[0]
    slot_pos = cache.slot_pos.copy()
    slot_pos[:start + T] = np.arange(start + T)
    quantized = scratch.quantized

    def attention_calls():
        for t0 in range(0, T, ATTENTION_TOKENS):
            t1 = min(T, t0 + ATTENTION_TOKENS)
            attention_prompt(qkv[t0:t1], positions[t0:t1], k, v, k_scale, v_scale, slot_pos, start + T, model.window,
                             H, Hk, Dh, scratch.scores, scratch.lanes, attn[t0:t1])

    parts = {
        "qkv": lambda: linear(model.isa, layer.qkv, xn, qkv, quantized, True),
        "attention": attention_calls,
        "o": lambda: linear(model.isa, layer.o, attn, xn, quantized, True),
        "gate_up": lambda: linear(model.isa, layer.gate_up, xn, gate_up, quantized, True),
        "down": lambda: linear(model.isa, layer.down, act, xn, quantized, True),
        "silu_mul": lambda: silu_mul(gate_up, act),
        "rmsnorm x2": lambda: (rmsnorm(x, layer.attn_norm, model.eps, xn), rmsnorm(x, layer.ffn_norm, model.eps, xn)),
        "rope": lambda: rope(qkv, positions, model.rope.short, model.rope.attention_factor, H, Hk, Dh, R),
        "store_kv": lambda: store_kv(qkv, positions, k, v, k_scale, v_scale, H, Hk, Dh),
        "add_into x2": lambda: (add_into(x, xn), add_into(x, xn)),
    }
    layers = len(model.layers)
    times = {name: fastest(run, repeat) * layers for name, run in parts.items()}
    logits = np.zeros((1, cfg.vocab_size), np.float32)

    def whole_step():
        cache.next_pos = start
        cache.slot_pos[start:] = -1
        backend._run(cache, tokens[start:], logits, True)

    total = fastest(whole_step, max(2, repeat // 2))
    print(f"chunk of {T} tokens at position {start}: {total * 1e3:.0f} ms, {T / total:.1f} tok/s")
    for name, seconds in sorted(times.items(), key=lambda item: -item[1]):
        print(f"  {name:12} {seconds * 1e3:8.1f} ms {100 * seconds / total:6.1f}%   per layer {seconds / layers * 1e3:6.2f} ms")
    rest = total - sum(times.values())
    print(f"  {'the rest':12} {rest * 1e3:8.1f} ms {100 * rest / total:6.1f}%   (embedding, the last token's logits, "
          "dispatch; negative when the parts ran in warmer caches)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--positions", default="0,448")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    backend = NumbaBackend(args.model)
    print(f"{args.model}: ISA {backend.isa.name}, {numba.get_num_threads()} threads")
    for start in (int(p) for p in args.positions.split(",")):
        profile(backend, start, args.repeat)


if __name__ == "__main__":
    main()
