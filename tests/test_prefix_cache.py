"""Prefix reuse: a prompt split anywhere, or started from another sequence's KV, gives the logits
of a cold prefill bit for bit; the PrefixCache's sharing rules and its LRU byte budget; and
transformers' logits for the reused prompts."""

import numpy as np
import pytest

import edgephi
from edgephi.generate import GenerationStats
from edgephi.prefix_cache import PrefixCache
from tests.fixtures import hf_logits, random_ids, rel_err


def cold_logits(folder, ids, **load):
    model = edgephi.load(folder, prefix_cache=0, **load)
    return model.sequence().feed(ids, all_logits=True)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("variant,quant", [("phi3_gqa_partial", "q4_0"), ("llama", "q4_1"), ("phi3_basic", "q8_0"),
                                           ("phi3_longrope", "q4_0"), ("phi3_sliding", "f32")])
def test_a_prompt_split_anywhere_gives_a_cold_prefills_logits(converted, variant, quant):
    """Prompt steps of 1, 3, 7 and 40 tokens, in any order, give each token the bits one step of the
    whole prompt gives it. With LongRoPE (long factors past 32 positions) the steps before the
    crossing see the short factors, as in transformers; from the step that crosses on, the cache
    has been recomputed with the long ones and every token matches again."""
    folder = converted(variant, quant)
    ids = random_ids(90, seed=3)
    cold = cold_logits(folder, ids)
    model = edgephi.load(folder, prefix_cache=0)
    switch = model.config.original_max_position_embeddings if model.config.rope_scaling else None
    for cuts in ((1, 4, 11, 51), (40, 47, 48), (89,)):
        sequence = model.sequence()
        starts, ends = (0,) + cuts, cuts + (len(ids),)
        ours = np.concatenate([sequence.feed(ids[a:b], all_logits=True) for a, b in zip(starts, ends)])
        first = 0 if switch is None else next(a for a, b in zip(starts, ends) if b > switch)
        assert np.array_equal(bits(ours[first:]), bits(cold[first:])), cuts


@pytest.mark.parametrize("variant,quant,kv_dtype", [("phi3_gqa_partial", "q4_0", "float16"),
                                                    ("llama", "q4_1", "int8"), ("phi3_longrope", "q4_0", "float16")])
def test_a_reused_prefix_gives_a_cold_prefills_logits(converted, variant, quant, kv_dtype):
    """A second prompt sharing 60 tokens with an earlier one takes them from the cache and gets
    the logits of a model without a prefix cache, bit for bit, at every position it computes."""
    folder = converted(variant, quant)
    shared = random_ids(60, seed=5)
    first, second = shared + random_ids(20, seed=6), shared + random_ids(9, seed=7)
    model = edgephi.load(folder, kv_dtype=kv_dtype)
    list(model.generate_tokens(first, max_new_tokens=3))
    sequence = model.sequence()
    taken = model.prefix_cache.restore(sequence.cache, np.array(second))
    assert taken == 60
    ours = sequence.feed(second[taken:], all_logits=True)
    cold = cold_logits(folder, second, kv_dtype=kv_dtype)
    assert np.array_equal(bits(ours), bits(cold[taken:]))


def test_a_reused_prefix_matches_transformers(converted, checkpoint_factory):
    """The float model's logits after a reused prefix against transformers, at forward parity's bound."""
    transformers = pytest.importorskip("transformers")
    src = checkpoint_factory("phi3_gqa_partial")
    folder = converted("phi3_gqa_partial", "f32")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="float32").eval()
    shared = random_ids(50, seed=8)
    model = edgephi.load(folder, kv_dtype="float32")
    list(model.generate_tokens(shared + random_ids(5, seed=9), max_new_tokens=1))
    second = shared + random_ids(12, seed=10)
    sequence = model.sequence()
    taken = model.prefix_cache.restore(sequence.cache, np.array(second))
    assert taken == 50
    ours = sequence.feed(second[taken:], all_logits=True)
    assert rel_err(ours, hf_logits(ref_model, second)[taken:]) < 1e-4


def test_generation_reports_the_reused_tokens_and_answers_as_cold(converted):
    folder = converted("phi3_gqa_partial", "q4_0")
    model, cold = edgephi.load(folder), edgephi.load(folder, prefix_cache=0)
    system = random_ids(300, seed=11)
    list(model.generate_tokens(system + random_ids(8, seed=12), max_new_tokens=4))
    prompt = system + random_ids(10, seed=13)
    stats = GenerationStats()
    ours = list(model.generate_tokens(prompt, max_new_tokens=12, stats=stats))
    assert stats.cached_tokens == 300 and stats.prompt_tokens == 310
    assert ours == list(cold.generate_tokens(prompt, max_new_tokens=12))


def test_chat_sessions_share_the_system_prompt(converted):
    """Turn 1 of a second session with the same long system prompt computes only the tokens after
    it; turn 2 of a session computes only its own new tokens. Replies equal a cold model's."""
    folder = converted("llama", "q4_1")
    model, cold = edgephi.load(folder, context=1024), edgephi.load(folder, context=1024, prefix_cache=0)
    system = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    first = model.chat_session(system=system, max_new_tokens=6)
    first("hello there")
    second = model.chat_session(system=system, max_new_tokens=6)
    reply = second("what is new")
    stats = second.last_stats
    assert stats.prompt_tokens > 300 and stats.prompt_tokens - stats.cached_tokens < 0.1 * stats.prompt_tokens
    reference = cold.chat_session(system=system, max_new_tokens=6)
    assert reply == reference("what is new")
    second("and then")
    assert second.last_stats.cached_tokens == 0 and second.last_stats.prompt_tokens < 0.1 * stats.prompt_tokens


def test_decoded_and_verified_tokens_are_not_shared(converted):
    """A reply's tokens come from decode steps, which a cold prefill of them would not reproduce bit
    for bit: the cache offers only the prompt, however long the generation ran."""
    folder = converted("phi3_gqa_partial", "q4_0")
    model = edgephi.load(folder)
    prompt = random_ids(40, seed=14)
    reply = list(model.generate_tokens(prompt, max_new_tokens=10, ignore_eos=True, lookup=3))
    extended = np.array(prompt + reply + random_ids(5, seed=15))
    assert model.prefix_cache.restore(model.sequence().cache, extended) == 40
    sequence = model.sequence()
    sequence.feed(prompt)
    sequence.step(reply[0])
    assert sequence.cache.exact_prefix == 40
    sequence.feed(reply[1:4], verify=True)
    assert sequence.cache.exact_prefix == 40
    sequence.truncate(30)
    assert sequence.cache.exact_prefix == 30
    sequence.feed(prompt[30:])  # a prompt step that continues the exact run extends it again
    assert sequence.cache.exact_prefix == 40


def offered(model, ids):
    sequence = model.sequence()
    sequence.feed(ids)
    return model.prefix_cache.offer(sequence.cache)


def test_lru_budget_and_what_is_stored(converted):
    folder = converted("phi3_gqa_partial", "q4_0")
    model = edgephi.load(folder)
    per_token = model.kv_bytes(1) + 8
    model.prefix_cache.budget_bytes = 240 * per_token  # two 100-token prompts, not three
    a, b, c = (random_ids(100, seed=s) for s in (20, 21, 22))

    def held(ids):
        return model.prefix_cache.restore(model.sequence().cache, np.array(ids + [7]))

    assert offered(model, a) and offered(model, b)
    assert model.prefix_cache.nbytes <= model.prefix_cache.budget_bytes
    assert held(a) == 100  # a is now the most recently used
    assert offered(model, c)  # so b goes
    assert (held(a), held(b), held(c)) == (100, 0, 100)
    assert not offered(model, a[:60])  # a prefix of a held entry: nothing new is stored
    assert offered(model, c + random_ids(20, seed=23))  # an extension replaces what it extends
    assert len(model.prefix_cache) == 2 and held(c) == 100
    assert not offered(model, random_ids(20, seed=24))  # below the 32 tokens worth a copy
    model.prefix_cache.budget_bytes = 50 * per_token
    assert not offered(model, random_ids(60, seed=25))  # larger than the whole budget
    none = edgephi.load(folder, prefix_cache=0)
    assert not offered(none, a) and len(none.prefix_cache) == 0


def test_no_reuse_where_a_cold_prefill_would_differ(converted):
    """A prompt that wraps the ring, or whose LongRoPE factors differ from the held keys', is
    computed cold."""
    folder = converted("phi3_longrope", "q4_0")  # long factors past 32 positions
    model = edgephi.load(folder, context=64)
    long_prompt = random_ids(60, seed=30)
    assert offered(model, long_prompt)
    small = model.sequence(context=40)
    assert model.prefix_cache.restore(small.cache, np.array(long_prompt)) == 0  # 60 tokens wrap a ring of 40
    cache = PrefixCache(1 << 20, long_rope_after=32, min_tokens=4)
    sequence = model.sequence()
    sequence.feed(long_prompt)
    assert sequence.cache.long_rope
    cache.offer(sequence.cache)
    assert cache.restore(model.sequence().cache, np.array(long_prompt[:20])) == 0  # short factors needed
    assert cache.restore(model.sequence().cache, np.array(long_prompt[:50])) == 49


def test_bad_budget_is_refused():
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="budget"):
            PrefixCache(bad)
