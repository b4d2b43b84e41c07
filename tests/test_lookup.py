"""Prompt-lookup decoding: the drafts (against a brute-force search), the acceptance rule's
distribution (against softmax itself), and generation with drafts against generation without."""

import numpy as np
import pytest
from edgephi.convert import convert

import edgephi
from edgephi.generate import GenerationStats, token_stream
from edgephi.lookup import propose
from edgephi.sampling import SamplingParams, accept_draft


def brute_force_drafts(context, k, max_ngram=3, min_ngram=2):
    """The k ids after the latest earlier occurrence of the longest matching tail n-gram."""
    ids = list(context)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                return ids[start + n:start + n + k]
    return []


def test_drafts_are_the_latest_longest_match():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        size = int(rng.integers(1, 40))
        context = rng.integers(0, int(rng.integers(2, 6)), size)  # small alphabets: many matches
        k = int(rng.integers(1, 7))
        assert propose(context, k) == brute_force_drafts(context, k), (context.tolist(), k)
    assert propose(np.array([1, 2, 3, 9, 1, 2, 3]), 3) == [9, 1, 2]  # the trigram, not the last "3"
    assert propose(np.array([1, 2, 3, 9, 3]), 3) == []  # a lone repeated id proposes nothing


def filtered_softmax(logits, temperature, top_k=0, top_p=1.0):
    """The distribution a sampler with these settings draws from, computed here from its definition."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.zeros(len(probs), bool)
    keep[order[:top_k or len(probs)]] = True
    if top_p < 1.0:
        kept = np.cumsum(probs[order]) - probs[order] < top_p  # the smallest prefix reaching top_p
        keep[order[~kept]] = False
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("settings", [dict(temperature=0.8), dict(temperature=1.3, top_k=4),
                                      dict(temperature=1.0, top_p=0.7)])
@pytest.mark.parametrize("draft", [0, 2, 5])
def test_accepting_a_draft_keeps_the_sampling_distribution(settings, draft):
    """Speculative sampling with a certain draft draws each token with the sampler's probability:
    40,000 draws within five standard deviations of it, and never a token the filters drop."""
    logits = np.array([2.0, 1.5, 0.3, -1.0, 0.9, 1.1], np.float32)
    rng = np.random.default_rng(1)
    n = 40_000
    counts = np.bincount([accept_draft(logits, draft, SamplingParams(**settings), rng) for _ in range(n)],
                         minlength=6)
    expected = filtered_softmax(logits, **settings)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) <= 5 * sigma)
    assert counts[expected == 0].sum() == 0


def test_verify_steps_stay_on_the_row_tiles():
    """The longest verify step (the pending token and MAX_DRAFT drafts) is shorter than a panel step."""
    from edgephi.lookup import MAX_DRAFT
    from edgephi.matmul import PANEL_MIN_TOKENS

    assert 1 + MAX_DRAFT < PANEL_MIN_TOKENS


def test_greedy_acceptance_is_the_argmax():
    logits = np.array([0.1, 3.0, 2.9], np.float32)
    rng = np.random.default_rng(0)
    assert accept_draft(logits, 2, SamplingParams(), rng) == 1 and accept_draft(logits, 1, SamplingParams(), rng) == 1


@pytest.fixture(scope="module")
def model(checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("lookup") / "m"
    convert(checkpoint_factory("phi3_basic"), out, quant="q8_0")
    return edgephi.load(out, context=256)


def run(model, prompt, **options):
    """Generated ids, stats, and the logits a next token gets from the sequence left behind."""
    sequence, stats = model.sequence(), GenerationStats()
    params = SamplingParams(**{k: v for k, v in options.items() if k not in ("max_new_tokens", "ignore_eos")})
    ids = list(token_stream(model, sequence, prompt, params=params, max_new_tokens=options["max_new_tokens"],
                            ignore_eos=options.get("ignore_eos", False), stats=stats))
    held = sequence.next_pos
    return ids, stats, sequence.feed([5]).copy(), held


def test_greedy_with_drafts_is_greedy_without(model):
    """Identical tokens, and a cache left holding exactly what plain decoding leaves (its next
    logits equal bit for bit). Over 200 tokens this random model takes a few drafts: the path where
    a verify step keeps some of them is exercised, not only the one that drops them all."""
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 500, 24)]
    plain, plain_stats, plain_next, plain_pos = run(model, prompt, max_new_tokens=200)
    accepted = 0
    for lookup in (1, 3, 6):
        ids, stats, next_logits, pos = run(model, prompt, max_new_tokens=200, lookup=lookup)
        assert ids == plain and pos == plain_pos
        np.testing.assert_array_equal(next_logits, plain_next)
        assert stats.drafts_proposed > 0 and stats.fed == plain_stats.fed
        accepted += stats.drafts_accepted
    assert accepted > 0, "precondition: some drafts were right"


def test_sampling_with_drafts_leaves_a_consistent_cache(model):
    """Sampled output differs from a run without drafts (the random draws differ), but the cache
    holds the prompt and the reply, as a fresh prefill of the prompt and decode of the reply compute it."""
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 500, 24)]
    ids, stats, next_logits, pos = run(model, prompt, max_new_tokens=200, lookup=4, temperature=0.3, seed=2,
                                       ignore_eos=True)
    assert len(ids) == 200 and pos == len(prompt) + 199 and stats.fed == prompt + ids[:-1]
    assert stats.drafts_proposed > 0, "precondition: the reply repeated itself"
    fresh = model.sequence()
    fresh.feed(prompt)
    for token in ids[:-1]:
        fresh.step(token)
    np.testing.assert_array_equal(fresh.feed([5]), next_logits)


def test_chat_session_with_lookup_replies_as_without(model):
    replies = []
    for lookup in (0, 5):
        session = model.chat_session(max_new_tokens=40, lookup=lookup)
        replies.append([session("Once upon a time"), session("and then?")])
    assert replies[0] == replies[1]
