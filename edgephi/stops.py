"""Stop strings in streamed text: find the first one in time linear in the text, whatever their length."""

from __future__ import annotations

from array import array
from collections import deque
from typing import Iterable, Iterator


def _borders(s: str) -> array:
    """KMP failure table: entry j is the length of the longest proper prefix of s that is also a
    suffix of s[:j + 1]. O(len(s)), 8 bytes per character (a list would hold an int object each)."""
    fail = array("q", bytes(8 * len(s)))
    k = 0
    for j in range(1, len(s)):
        c = s[j]
        while k and s[k] != c:
            k = fail[k - 1]
        if s[k] == c:
            k += 1
        fail[j] = k
    return fail


class StopMatcher:
    """Feeds text piece by piece and reports where the first stop string begins.

    Each stop string keeps a KMP state (the length of the longest suffix of the text fed so far
    that is a proper prefix of it), so a character costs amortized O(1) per stop string, however
    long the stop strings are. After a match the matcher is finished: feed() ignores its text and
    returns the same offset again.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        if not all(isinstance(s, str) and s for s in self.stops):
            raise ValueError("stop strings must be non-empty strings")
        self._fail = [_borders(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.fed = 0  # characters consumed so far
        self.match: int | None = None  # offset where the first stop string begins, once found

    @property
    def held(self) -> int:
        """Length of the longest suffix of the text fed so far that is a proper prefix of some stop
        string: what a streamer must hold back (0 once a stop string has been found)."""
        return 0 if self.match is not None else max(self._state, default=0)

    def feed(self, text: str) -> int | None:
        """Consume text; return the offset (counted over everything fed) where the earliest-starting
        stop string that is now complete begins, or None. Equals min(s.find) over the whole text."""
        if self.match is not None:
            return self.match
        best = None
        for k, (s, fail) in enumerate(zip(self.stops, self._fail)):
            end = len(text)
            if best is not None:  # an occurrence completing at index >= end starts at or after best
                end = min(end, best - self.fed + len(s) - 1)
            q, done = self._scan(s, fail, self._state[k], text, end)
            self._state[k] = q
            if done >= 0:
                best = self.fed + done - len(s)
        self.fed += len(text)
        self.match = best
        return best

    @staticmethod
    def _scan(s: str, fail: array, q: int, text: str, end: int) -> tuple[int, int]:
        """Run KMP from state q over text[:end]; return (state, index just past the first completed
        occurrence of s) or (state, -1)."""
        m, first, i, blocks_from = len(s), s[0], 0, 0
        while i < end:
            if q == 0:  # nothing matched yet: let str.find skip to the next possible start in C
                i = text.find(first, i, end)
                if i < 0:
                    return 0, -1
            elif q >= 16 and i >= blocks_from:
                # inside a long partial match: compare doubling blocks in C instead of characters;
                # a failed block costs at most twice what the matched ones advanced
                step = 16
                while step <= min(m - q, end - i) and text.startswith(s[q:q + step], i):
                    q, i, step = q + step, i + step, 2 * step
                if q == m:
                    return q, i
                blocks_from = i + step  # the failed block holds the mismatch: go char by char
                continue
            c = text[i]
            while q and s[q] != c:
                q = fail[q - 1]
            if s[q] == c:
                q += 1
            i += 1
            if q == m:
                return q, i
        return q, -1


class StopFilter:
    """Turns decoded text pieces into text safe to show: it never emits any part of a stop string,
    ends just before the first one, and (when none occurs) emits everything by flush()."""

    def __init__(self, stops: Iterable[str]):
        self.matcher = StopMatcher(stops)
        self._pending: deque[str] = deque()  # pieces not fully emitted; the first from _skip on
        self._skip = 0
        self._emitted = 0  # characters emitted so far
        self.stopped = False  # a stop string was found: the output is complete

    def push(self, piece: str) -> str:
        """Add a piece; return the text that became safe to emit (possibly '')."""
        if self.stopped or not piece:
            return ""
        hit = self.matcher.feed(piece)
        self._pending.append(piece)
        if hit is not None:
            self.stopped = True
            out = self._take(hit)
            self._pending.clear()
            return out
        return self._take(self.matcher.fed - self.matcher.held)

    def flush(self) -> str:
        """At the end of the stream: the text still held back ('' after a stop string)."""
        return "" if self.stopped else self._take(self.matcher.fed)

    def _take(self, end: int) -> str:
        # slices only what is emitted, so a long held-back tail is never copied again and again
        out = []
        while self._emitted < end:
            piece = self._pending[0]
            n = min(len(piece) - self._skip, end - self._emitted)
            out.append(piece[self._skip:self._skip + n])
            self._emitted += n
            self._skip += n
            if self._skip == len(piece):
                self._pending.popleft()
                self._skip = 0
        return "".join(out)


def cut_at_stops(pieces: Iterable[str], stops: Iterable[str]) -> Iterator[str]:
    """The non-empty safe pieces of a text stream; stops pulling pieces once a stop string is found."""
    stop_filter = StopFilter(stops)
    for piece in pieces:
        out = stop_filter.push(piece)
        if out:
            yield out
        if stop_filter.stopped:
            return
    out = stop_filter.flush()
    if out:
        yield out
