"""Batched decoding (#18): concurrent sequences' decode steps run as one forward step, and each
sequence gets the logits its step would have alone, bit for bit. The reference for every batched
row is the same model's solo decode step of a twin sequence (the row dots, whose agreement with
transformers tests/test_forward_parity.py holds); the StepBatcher's gathering is checked with
stand-in steps."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import edgephi
from edgephi.decode_batch import StepBatcher
from tests.fixtures import random_ids


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


# -- the batcher, with stand-in steps --------------------------------------------------------------

class FakeCache:
    def __init__(self, name):
        self.name, self.logits = name, None


class Recorder:
    """run_one / run_many that record each batch and take `seconds` per step."""

    def __init__(self, seconds=0.005, fail=None):
        self.batches, self.seconds, self.fail = [], seconds, fail

    def one(self, cache, token):
        self.many([cache], [token])

    def many(self, caches, tokens):
        self.batches.append([c.name for c in caches])
        time.sleep(self.seconds)
        if self.fail is not None and self.fail in tokens:
            raise RuntimeError(f"token {self.fail}")
        for c, t in zip(caches, tokens):
            c.logits = (c.name, t)


def run_threads(batcher, caches, steps):
    results, errors = {c.name: [] for c in caches}, []

    def work(cache):
        try:
            for t in range(steps):
                results[cache.name].append(batcher.step(cache, t))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in caches]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return results, errors


def test_concurrent_steps_run_together_and_each_gets_its_own_result():
    rec = Recorder()
    batcher = StepBatcher(rec.one, rec.many, max_batch=8, gather_seconds=0.5)
    caches = [FakeCache(f"s{i}") for i in range(4)]
    results, errors = run_threads(batcher, caches, steps=20)
    assert not errors
    assert all(results[c.name] == [(c.name, t) for t in range(20)] for c in caches)
    # once all four are decoding, every batch holds all four
    full = [b for b in rec.batches if len(b) == 4]
    assert len(full) >= 18 and sum(map(len, rec.batches)) == 80
    assert batcher.steps == 80 and batcher.batches == len(rec.batches)


def test_batches_never_exceed_max_batch():
    rec = Recorder(seconds=0.002)
    batcher = StepBatcher(rec.one, rec.many, max_batch=3, gather_seconds=0.5)
    results, errors = run_threads(batcher, [FakeCache(i) for i in range(7)], steps=10)
    assert not errors and max(map(len, rec.batches)) == 3 and sum(map(len, rec.batches)) == 70
    assert all(r == [(name, t) for t in range(10)] for name, r in results.items())


def test_a_lone_sequence_never_waits():
    rec = Recorder(seconds=0)
    batcher = StepBatcher(rec.one, rec.many, gather_seconds=30)
    cache = FakeCache("a")
    started = time.monotonic()
    for t in range(50):
        assert batcher.step(cache, t) == ("a", t)
    assert time.monotonic() - started < 5  # a 30 s gather would show
    assert rec.batches == [["a"]] * 50


def test_a_sequence_that_stops_costs_the_others_one_gather():
    rec = Recorder(seconds=0.001)
    batcher = StepBatcher(rec.one, rec.many, gather_seconds=0.3)
    a, b = FakeCache("a"), FakeCache("b")
    run_threads(batcher, [a, b], steps=3)  # both in the last batch
    started = time.monotonic()
    for t in range(10):  # b has left: a waits for it once, then runs alone
        batcher.step(a, t)
    took = time.monotonic() - started
    assert 0.25 < took < 2.0
    forgotten = StepBatcher(rec.one, rec.many, gather_seconds=0.3)
    run_threads(forgotten, [a, b], steps=3)
    forgotten.gather_seconds = 30  # a wait for b would now show
    forgotten.forget(b)  # b went to compute a prompt: nobody waits for it
    started = time.monotonic()
    forgotten.step(a, 0)
    assert time.monotonic() - started < 5


def test_an_error_reaches_every_step_of_its_batch():
    rec = Recorder(fail=3)
    batcher = StepBatcher(rec.one, rec.many, gather_seconds=0.5)
    results, errors = run_threads(batcher, [FakeCache(i) for i in range(3)], steps=6)
    # every thread of the batch that held a token 3 raises it (threads may be a step apart)
    assert len(errors) == 3 and all("token 3" in str(e) for e in errors)
    assert all(2 <= len(r) <= 3 for r in results.values())


# -- the batched forward step against solo decode steps --------------------------------------------


def twin_sequences(model, prompts, capacities):
    """Two sequences per prompt, fed alike: one for solo steps, one for batched steps."""
    pairs = []
    for ids, capacity in zip(prompts, capacities):
        solo, batched = model.sequence(capacity), model.sequence(capacity)
        first = solo.feed(ids).copy()
        assert np.array_equal(bits(batched.feed(ids)), bits(first))
        pairs.append((solo, batched, int(np.argmax(first[0]))))
    return pairs


def decode_both_ways(model, pairs, steps):
    """Greedy decode every pair `steps` times, the solo twin alone and the batched twins together."""
    backend = model.backend
    tokens = [t for _, _, t in pairs]
    for step in range(steps):
        solo_rows = [solo.step(t).copy() for (solo, _, _), t in zip(pairs, tokens)]
        backend._step_many([b.cache for _, b, _ in pairs], tokens)
        for i, ((_, batched, _), row) in enumerate(zip(pairs, solo_rows)):
            assert np.array_equal(bits(batched.cache.logits), bits(row)), (step, i)
        tokens = [int(np.argmax(r[0])) for r in solo_rows]


CASES = [("phi3_gqa_partial", "q4_0", "float16"), ("llama", "q4_1", "int8"), ("phi3_basic", "q8_0", "float32"),
         ("phi3_basic", "f32", "float16"), ("phi3_sliding", "f16", "float16"), ("phi3_longrope", "q4_0", "float16")]


@pytest.mark.parametrize("variant,quant,kv_dtype", CASES)
def test_a_batched_step_gives_each_sequence_its_solo_logits(converted, variant, quant, kv_dtype):
    """Sequences at different lengths (one whose small ring wraps while decoding; with LongRoPE,
    one past the switch to the long factors beside ones before it) decode 8 steps in batches of
    1 to 8: every row equals the sequence's own solo step, bit for bit."""
    model = edgephi.load(converted(variant, quant), kv_dtype=kv_dtype, prefix_cache=0)
    lengths = [3, 17, 40, 9, 25, 12, 30, 5]
    prompts = [random_ids(n, seed=10 + i) for i, n in enumerate(lengths)]
    capacities = [None, 24, None, None, None, None, None, None]  # 17 + 8 steps wrap a 24-slot ring
    pairs = twin_sequences(model, prompts, capacities)
    if model.config.rope_scaling:
        assert pairs[2][1].cache.long_rope and not pairs[0][1].cache.long_rope  # past 32 and before it
    for size in (2, 5, 8):
        decode_both_ways(model, pairs[:size], steps=3 if size < 8 else 8)


def test_threads_decoding_together_get_their_solo_tokens(converted):
    """The batching as apps meet it: threads generating at once (numba backend) get the tokens
    each gets alone, and their steps ran in shared batches."""
    model = edgephi.load(converted("phi3_gqa_partial", "q4_0"), prefix_cache=0)
    prompts = [random_ids(n, seed=40 + n) for n in (4, 11, 23, 7)]
    solo = [list(model.generate_tokens(p, max_new_tokens=24, ignore_eos=True)) for p in prompts]
    batcher = model.backend.batcher
    before = (batcher.batches, batcher.steps)
    results = [None] * 4
    start = threading.Barrier(4)

    def work(i):
        start.wait()
        results[i] = list(model.generate_tokens(prompts[i], max_new_tokens=24, ignore_eos=True))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert results == solo
    batches, steps = batcher.batches - before[0], batcher.steps - before[1]
    assert steps == 4 * 23 and batches < steps * 0.6, (batches, steps)  # the first token comes from the prompt
