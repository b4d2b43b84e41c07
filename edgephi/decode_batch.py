"""Decode steps of concurrent sequences gathered into one forward step (continuous batching).

Each generation keeps its own thread and calls step() as if alone. The first caller to find no batch
running leads: it waits (at most GATHER_SECONDS) until every sequence of the last batch has asked
again, takes up to max_batch waiting steps, runs them as one, and hands each caller its logits.
Sequences join the next batch as their prompts finish and leave when they stop asking, so nothing
needs registering. A lone sequence never waits: it was the whole last batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

GATHER_SECONDS = 0.004  # longest wait for the last batch's sequences: a sampling step takes well under this
MAX_BATCH = 8


class _Step:
    __slots__ = ("cache", "token", "done", "error")

    def __init__(self, cache, token: int):
        self.cache, self.token, self.done, self.error = cache, token, False, None


class StepBatcher:
    """Runs concurrent step(cache, token) calls in batches: run_one(cache, token) for a batch of
    one, run_many(caches, tokens) for more; both leave each cache's logits in cache.logits."""

    def __init__(self, run_one: Callable, run_many: Callable, max_batch: int = MAX_BATCH,
                 gather_seconds: float = GATHER_SECONDS):
        self._run_one, self._run_many = run_one, run_many
        self.max_batch, self.gather_seconds = max_batch, gather_seconds
        self._cond = threading.Condition()
        self._waiting: list[_Step] = []
        self._running = False
        self._last: set[int] = set()  # id() of the caches of the last batch
        self.batches = 0  # batches run, and the steps in them (for benchmarks and tests)
        self.steps = 0

    def forget(self, cache) -> None:
        """The cache takes a step of another kind (a prompt, a verify step): do not wait for it."""
        with self._cond:
            self._last.discard(id(cache))

    def step(self, cache, token: int):
        mine = getattr(cache, "_step_record", None)
        if mine is None:  # one record per cache, reused at every token
            mine = cache._step_record = _Step(None, token)
        mine.cache, mine.token, mine.done, mine.error = cache, token, False, None
        with self._cond:
            self._waiting.append(mine)
            self._cond.notify_all()
            while not mine.done:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True  # one leader at a time, gathering included
                batch = self._gather()
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        mine.cache = None  # no cycle between the cache and its record: an ended cache is freed at once
        if mine.error is not None:
            raise mine.error
        return cache.logits

    def _gather(self) -> list[_Step]:
        """Called holding the lock, as the leader: the steps to run now."""
        deadline = time.monotonic() + self.gather_seconds
        while len(self._waiting) < self.max_batch:  # cond.wait lets the others in to append
            waiting = {id(s.cache) for s in self._waiting}
            if self._last <= waiting:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
        self._last = {id(s.cache) for s in batch}
        return batch

    def _run(self, batch: list[_Step]) -> None:
        try:
            if len(batch) == 1:
                self._run_one(batch[0].cache, batch[0].token)
            else:
                self._run_many([s.cache for s in batch], [s.token for s in batch])
        except BaseException as exc:  # noqa: BLE001  (each caller raises it in its own thread)
            for s in batch:
                s.error = exc
        self.batches += 1
        self.steps += len(batch)
        for s in batch:
            s.done = True
