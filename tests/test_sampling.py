"""Sampling: argument checks, each filter against a hand-worked example or transformers' own
logits processors, and the empirical distribution of draws against the filtered softmax."""

import math

import numpy as np
import pytest

from edgephi.sampling import (SamplingParams, apply_repetition_penalty, filter_min_p, filter_top_k, filter_top_p,
                              sample)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def kept(logits) -> set[int]:
    return set(np.nonzero(np.isfinite(logits))[0].tolist())


# ---------------------------------------------------------------------------------------------
# SamplingParams


@pytest.mark.parametrize("name,value", [
    ("temperature", -1.0), ("temperature", -0.001), ("temperature", float("nan")), ("temperature", "1"),
    ("temperature", None),
    ("top_k", -1), ("top_k", 2.5), ("top_k", "3"),
    ("top_p", 0), ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", float("nan")), ("top_p", "0.9"),
    ("min_p", -0.1), ("min_p", 1.0), ("min_p", 2), ("min_p", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1.2), ("repetition_penalty", float("nan")),
    ("repetition_penalty", "1.1"),
    ("seed", 1.5), ("seed", "7"),
])
def test_bad_sampling_argument_raises_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("kwargs", [
    {}, {"temperature": 0}, {"temperature": 1.5}, {"top_k": 0}, {"top_k": 40}, {"top_p": 1}, {"top_p": 0.01},
    {"min_p": 0}, {"min_p": 0.99}, {"repetition_penalty": 0.5}, {"repetition_penalty": 1.3}, {"seed": 0},
    {"seed": 2**40},
])
def test_good_sampling_arguments_are_accepted(kwargs):
    params = SamplingParams(**kwargs)
    for k, v in kwargs.items():
        assert getattr(params, k) == v


# ---------------------------------------------------------------------------------------------
# temperature 0


def test_temperature_zero_is_argmax_and_draws_nothing():
    rng = np.random.default_rng(123)
    state = rng.bit_generator.state
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    params = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2, seed=4)
    for _ in range(3):
        assert sample(logits, params, rng) == int(np.argmax(logits))
    assert rng.bit_generator.state == state


def test_temperature_zero_with_repetition_penalty_is_argmax_of_penalised_logits():
    logits = np.array([1.0, 3.0, 2.9, -1.0], np.float32)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    # token 1 was seen: 3.0 / 1.2 = 2.5 < 2.9, so token 2 wins
    assert sample(logits, SamplingParams(repetition_penalty=1.2), rng, np.array([1, 1, 3])) == 2
    assert sample(logits, SamplingParams(), rng, np.array([1, 1, 3])) == 1  # penalty 1: unchanged
    assert rng.bit_generator.state == state


# ---------------------------------------------------------------------------------------------
# filters, hand-worked

PROBS = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
LOGITS = np.log(PROBS)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 17, 99])
def test_top_k_keeps_exactly_k(k):
    logits = np.random.default_rng(k).permutation(np.arange(100, dtype=np.float64)) * 0.37 - 10
    out = filter_top_k(logits, k)
    want = set(np.argsort(-logits)[:k].tolist())
    assert kept(out) == want and len(want) == k
    assert np.array_equal(out[list(want)], logits[list(want)])  # survivors unchanged


def test_top_k_zero_or_large_keeps_all():
    logits = np.arange(6.0)
    assert kept(filter_top_k(logits, 0)) == set(range(6))
    assert kept(filter_top_k(logits, 6)) == set(range(6))
    assert kept(filter_top_k(logits, 60)) == set(range(6))


@pytest.mark.parametrize("p,want", [
    (0.3, {1}), (0.49, {1}), (0.51, {1, 3}), (0.79, {1, 3}), (0.81, {1, 3, 2}), (0.94, {1, 3, 2}),
    (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, want):
    out = filter_top_p(LOGITS, p)
    assert kept(out) == want
    assert np.array_equal(out[list(want)], LOGITS[list(want)])


def test_top_p_at_exact_boundaries():
    """Probabilities that are exact binary fractions: a set whose mass equals p reaches p."""
    logits = np.log(np.array([0.125, 0.5, 0.125, 0.25]))
    assert kept(filter_top_p(logits, 0.5)) == {1}
    assert kept(filter_top_p(logits, 0.75)) == {1, 3}
    out = kept(filter_top_p(logits, 0.875))  # tokens 0 and 2 tie: either completes the set
    assert len(out) == 3 and {1, 3} < out


def test_top_p_matches_brute_force_definition():
    """The kept set is the smallest prefix (by probability) whose mass reaches p, checked on
    random distributions away from exact ties with p."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        logits = rng.standard_normal(30) * 3
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        p = rng.uniform(0.05, 0.99)
        if np.min(np.abs(cum - p)) < 1e-9:
            continue
        n = int(np.argmax(cum >= p)) + 1
        assert kept(filter_top_p(logits, p)) == set(order[:n].tolist())


@pytest.mark.parametrize("min_p,want", [
    (0.05, {0, 1, 2, 3}), (0.09, {0, 1, 2, 3}), (0.11, {1, 2, 3}), (0.29, {1, 2, 3}), (0.31, {1, 3}),
    (0.59, {1, 3}), (0.61, {1}), (0.0, {0, 1, 2, 3}),
])
def test_min_p_drops_tokens_below_min_p_times_the_best(min_p, want):
    # thresholds: 0.05/0.5 = 0.1, 0.15/0.5 = 0.3, 0.3/0.5 = 0.6
    assert kept(filter_min_p(LOGITS, min_p)) == want


@pytest.mark.parametrize("name,ours,theirs", [
    ("top_k", lambda x: filter_top_k(x, 7), lambda: transformers.TopKLogitsWarper(top_k=7)),
    ("top_p", lambda x: filter_top_p(x, 0.8), lambda: transformers.TopPLogitsWarper(top_p=0.8)),
    ("min_p", lambda x: filter_min_p(x, 0.1), lambda: transformers.MinPLogitsWarper(min_p=0.1)),
])
def test_filters_match_transformers_warpers(name, ours, theirs):
    rng = np.random.default_rng(3)
    for _ in range(20):
        logits = rng.standard_normal(64) * 2
        ref = theirs()(torch.zeros((1, 1), dtype=torch.long), torch.from_numpy(logits)[None].clone())[0].numpy()
        assert kept(ours(logits)) == kept(ref), name


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal(50) * 3).astype(np.float32)
    logits[[3, 4]] = 0.0
    previous = np.array([3, 7, 7, 12, 4, 49, 0, 12, 21, 33])
    logits[[7, 12]] = [2.5, -2.5]
    for penalty in (1.3, 0.7, 1.0):
        ours = apply_repetition_penalty(logits, previous, penalty)
        proc = transformers.RepetitionPenaltyLogitsProcessor(penalty=penalty)
        ref = proc(torch.from_numpy(previous)[None], torch.from_numpy(logits)[None].clone())[0].numpy()
        assert np.allclose(ours, ref, rtol=1e-6, atol=0), penalty
    assert apply_repetition_penalty(logits, previous, 1.3)[7] == pytest.approx(2.5 / 1.3)
    assert apply_repetition_penalty(logits, previous, 1.3)[12] == pytest.approx(-2.5 * 1.3)
    untouched = np.setdiff1d(np.arange(50), previous)
    assert np.array_equal(apply_repetition_penalty(logits, previous, 1.3)[untouched], logits[untouched])


def test_repetition_penalty_does_not_modify_the_input():
    logits = np.array([1.0, -1.0, 2.0])
    before = logits.copy()
    apply_repetition_penalty(logits, np.array([0, 1]), 2.0)
    assert np.array_equal(logits, before)


# ---------------------------------------------------------------------------------------------
# draws


def reference_distribution(logits, temperature, top_k, top_p, min_p):
    """transformers' warpers in its own order (temperature, top-k, top-p, min-p), then softmax."""
    scores = torch.from_numpy(np.asarray(logits, np.float64))[None].clone()
    ids = torch.zeros((1, 1), dtype=torch.long)
    for warper in (transformers.TemperatureLogitsWarper(temperature), transformers.TopKLogitsWarper(top_k),
                   transformers.TopPLogitsWarper(top_p), transformers.MinPLogitsWarper(min_p)):
        scores = warper(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 6, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (0.9, 0, 1.0, 0.08), (0.8, 8, 0.9, 0.02),
])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p, min_p):
    logits = np.array([2.0, 1.5, 1.4, 0.9, 0.3, 0.0, -0.2, -0.8, -1.5, -3.0, 1.0, 0.5], np.float32)
    want = reference_distribution(logits, temperature, top_k or len(logits), top_p, min_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rng = np.random.default_rng(2024)
    n = 8000
    draws = np.array([sample(logits, params, rng) for _ in range(n)])
    counts = np.bincount(draws, minlength=len(logits))
    assert np.all(counts[want == 0] == 0), "a filtered-out token was drawn"
    support = want > 0
    expected = n * want[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df) + 6, (chi2, df, counts, expected)


def test_same_seed_same_draws():
    logits = np.random.default_rng(5).standard_normal(200)
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = [sample(logits, params, np.random.default_rng(77)) for _ in range(1)]
    r1, r2, r3 = np.random.default_rng(77), np.random.default_rng(77), np.random.default_rng(78)
    s1 = [sample(logits, params, r1) for _ in range(100)]
    s2 = [sample(logits, params, r2) for _ in range(100)]
    s3 = [sample(logits, params, r3) for _ in range(100)]
    assert s1 == s2 and s1[:1] == a
    assert s1 != s3
