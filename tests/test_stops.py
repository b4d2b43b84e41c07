"""StopMatcher and StopFilter against a brute-force reference (str.find over all the text so far)."""

import random
import time

import pytest

from edgephi.stops import StopFilter, StopMatcher, cut_at_stops


def reference_match(text, stops):
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def reference_held(text, stops):
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def random_pieces(rng, text):
    pieces, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 2, 3, 5, 8, 20])
        pieces.append(text[i:i + n])
        i += n
    return pieces


ALPHABETS = ["ab", "abc", "aab ", "xé中😀<|>"]


def random_case(rng):
    alphabet = rng.choice(ALPHABETS)
    word = lambda n: "".join(rng.choice(alphabet) for _ in range(n))  # noqa: E731
    stops = [word(rng.randint(1, 6)) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.5:  # a stop that is a prefix, suffix or middle of another one
        s = rng.choice(stops)
        if len(s) > 1:
            a = rng.randrange(len(s))
            stops.append(s[a:rng.randint(a + 1, len(s))])
    text = word(rng.randint(0, 60))
    if rng.random() < 0.3:
        text = "".join(rng.choice(stops)[:-1] + word(1) for _ in range(6))  # near misses
    return tuple(stops), text


CASES = [random_case(random.Random(seed)) for seed in range(3000)]


def test_cases_cover_matches_misses_and_long_holds():
    outcomes = [reference_match(text, stops) for stops, text in CASES]
    assert sum(o is None for o in outcomes) > 300 and sum(o is not None for o in outcomes) > 300
    assert any(reference_held(text, stops) >= 3 for stops, text in CASES)


@pytest.mark.parametrize("seed", range(4))
def test_matcher_equals_brute_force_after_every_piece(seed):
    rng = random.Random(seed)
    checked = 0
    for stops, text in CASES[seed::4]:
        matcher, fed, expected = StopMatcher(stops), "", None
        for piece in random_pieces(rng, text):
            fed += piece
            got = matcher.feed(piece)
            if expected is None:
                expected = reference_match(fed, stops)
            assert got == expected, (stops, fed)
            if expected is None:
                assert matcher.fed == len(fed)
                assert matcher.held == reference_held(fed, stops), (stops, fed)
            checked += 1
    assert checked > 1000


def test_long_stops_with_near_misses_equal_brute_force():
    # stops long enough for the block comparisons inside long partial matches (16+ characters)
    rng = random.Random(11)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(16, 90))) for _ in range(rng.randint(1, 3))]
        parts = []
        for _ in range(rng.randint(1, 6)):
            s = rng.choice(stops)
            k = rng.randrange(len(s))
            parts.append(s[:k] + ("b" if s[k] == "a" else "a") + s[k + 1:] if rng.random() < 0.8 else s)
            parts.append("".join(rng.choice("ab") for _ in range(rng.randint(0, 5))))
        text, fed, expected = "".join(parts), "", None
        matcher = StopMatcher(stops)
        cuts = sorted({0, len(text), *(rng.randrange(len(text) + 1) for _ in range(rng.randint(0, 4)))})
        for piece in [text[a:b] for a, b in zip(cuts, cuts[1:])]:
            fed += piece
            got = matcher.feed(piece)
            expected = expected if expected is not None else reference_match(fed, stops)
            assert got == expected, (stops, fed)
            if expected is None:
                assert matcher.held == reference_held(fed, stops), (stops, fed)


def test_earliest_start_wins_when_several_stops_complete_together():
    assert StopMatcher(("bcd", "abcde")).feed("xabcdef") == 1
    assert StopMatcher(("abcde", "bcd")).feed("xabcdef") == 1
    # fed one character at a time, "bcd" completes first: it wins, as in text_stream today
    matcher = StopMatcher(("abcde", "bcd"))
    assert [matcher.feed(c) for c in "xabcd"] == [None, None, None, None, 2]
    assert matcher.feed("e") == 2  # finished: the first answer stays


@pytest.mark.parametrize("seed", range(4))
def test_filter_emits_exactly_the_text_before_the_first_stop(seed):
    rng = random.Random(100 + seed)
    for stops, text in CASES[seed::4]:
        pieces = random_pieces(rng, text)
        stop_filter, emitted, fed, cut = StopFilter(stops), "", "", None
        for piece in pieces:
            fed += piece
            emitted += stop_filter.push(piece)
            if cut is None:  # the earliest stop string in the text up to the piece completing one
                cut = reference_match(fed, stops)
            if cut is None:  # everything but what may still begin a stop string
                assert emitted == fed[:len(fed) - reference_held(fed, stops)]
        emitted += stop_filter.flush()
        assert emitted == (text if cut is None else text[:cut]), (stops, pieces)
        assert stop_filter.stopped == (cut is not None)
        assert "".join(cut_at_stops(pieces, stops)) == emitted


def test_cut_at_stops_stops_pulling_pieces_after_a_stop():
    pulled = []

    def pieces():
        for p in ["Hello", " wor", "ld<|e", "nd|>", "never", "read"]:
            pulled.append(p)
            yield p

    assert list(cut_at_stops(pieces(), ["<|end|>"])) == ["Hello", " wor", "ld"]
    assert pulled == ["Hello", " wor", "ld<|e", "nd|>"]
    assert list(cut_at_stops(["a<", "|e", "nd"], ["<|end|>"])) == ["a", "<|end"]  # held, then flushed
    assert list(cut_at_stops(["abc"], [])) == ["abc"]


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])


def old_text_stream_hold(pending, stop):
    # the per-token hold-back computation text_stream used before StopFilter
    return max((k for s in stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)


@pytest.mark.parametrize("kind", ["periodic", "random"])
def test_a_million_character_stop_string_costs_linear_time(kind):
    n, rng = 10**6, random.Random(7)
    if kind == "periodic":  # the text matches all but the stop's last character for a long time
        stop = "a" * (n - 1) + "b"
        text = "a" * n + "b"
    else:  # random over two letters: many partial matches and failure-link walks
        stop = "".join(rng.choice("ab") for _ in range(n))
        text = "".join(rng.choice("ab") for _ in range(n)) + stop
    cuts = [len(text) * i // 2000 for i in range(2001)]
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    assert len(pieces) == 2000
    started = time.perf_counter()
    out = "".join(cut_at_stops(pieces, [stop]))
    elapsed = time.perf_counter() - started
    assert out == text[:text.find(stop)]
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    # the old per-token computation on a small fraction of this work already takes longer
    started = time.perf_counter()
    old_text_stream_hold("a" * 3000, ["a" * 3000 + "b"])
    old = time.perf_counter() - started
    assert old > 0 and (n / 3000) ** 2 * old > 100 * elapsed
