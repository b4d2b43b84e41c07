"""The rings of ended sequences serve the next ones (ring_pool.py): a sequence starting in an ended
one's ring computes what it would in a fresh ring, bit for bit; live sequences never share one;
the pool keeps within its budget."""

import gc

import numpy as np
import pytest

import edgephi
from edgephi.convert import convert
from tests.fixtures import random_ids

CONTEXT = 64


@pytest.fixture(scope="module")
def folder(checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("pool") / "m"
    convert(checkpoint_factory("phi3_gqa_partial"), out, quant="q4_0")
    return out


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


def run(sequence, prompt, steps):
    """The prompt's logits, then `steps` greedy decode steps' (the ring wraps past CONTEXT)."""
    out = [sequence.feed(prompt, all_logits=True)]
    token = int(np.argmax(out[0][-1]))
    for _ in range(steps):
        out.append(sequence.step(token).copy())
        token = int(np.argmax(out[-1][-1]))
    return np.concatenate(out)


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_a_sequence_in_an_ended_ones_ring_computes_what_a_fresh_ring_does(folder, kv_dtype):
    model = edgephi.load(folder, context=CONTEXT, prefix_cache=0, kv_dtype=kv_dtype)
    first = model.sequence()
    run(first, random_ids(150, seed=1), 5)  # wraps: every slot holds something stale afterwards
    buffer = first.cache.k.ctypes.data
    del first
    gc.collect()
    assert model.backend.ring_pool.held_bytes == model.kv_bytes()
    second = model.sequence()
    got = run(second, random_ids(40, seed=2), 30)
    assert second.cache.k.ctypes.data == buffer, "the ended ring was not reused"
    assert model.backend.ring_pool.held_bytes == 0
    fresh = edgephi.load(folder, context=CONTEXT, prefix_cache=0, kv_dtype=kv_dtype).sequence()
    assert np.array_equal(bits(got), bits(run(fresh, random_ids(40, seed=2), 30)))


def test_live_sequences_never_share_a_ring_and_the_pool_keeps_its_budget(folder):
    model = edgephi.load(folder, context=CONTEXT, prefix_cache=0)
    pool = model.backend.ring_pool
    ids = random_ids(CONTEXT, seed=3)
    live = [model.sequence() for _ in range(3)]
    for sequence in live:
        sequence.feed(ids)
    arrays = [s.cache.k for s in live]
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])
    del live, arrays, sequence
    gc.collect()
    assert pool.held_bytes == pool.budget == model.kv_bytes()  # one full ring's worth: the others went
    short = model.sequence()
    short.feed(ids[:5])
    assert pool.held_bytes == 0  # taken by the first write, however short
    kept = model.sequence()
    kept.feed(ids[:3])  # nothing left to take: its own ring
    del short
    gc.collect()
    kept.feed(ids[3:6])  # a ring already written keeps itself
    assert pool.held_bytes == model.kv_bytes()


def test_a_closed_sessions_ring_serves_the_next_session(folder):
    model = edgephi.load(folder, context=CONTEXT)
    session = model.chat_session(max_new_tokens=4)
    session("hello")
    buffer = session.sequence.cache.v.ctypes.data
    session.close()
    gc.collect()
    assert model.backend.ring_pool.held_bytes > 0
    other = model.chat_session(max_new_tokens=4)
    other("hello again")
    assert other.sequence.cache.v.ctypes.data == buffer
