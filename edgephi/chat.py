"""Chat sessions: conversations that keep their own KV cache between turns, so a turn costs only
its own tokens and sessions sharing a model never see each other's context."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import EdgephiError
from .generate import (DEFAULT_MAX_NEW_TOKENS, GenerationStats, check_max_new_tokens, check_stop, text_stream,
                       token_stream)
from .sampling import SamplingParams


class ChatSession:
    """A conversation with one model. It owns its KV cache (a sequence of the model), so sessions
    never see each other's context, in one thread or many. Each send() renders the whole
    conversation with the chat template and feeds only the tokens the cache does not hold yet.

    Memory: the KV ring fills as the conversation grows, up to model.kv_bytes() (pages are mapped
    only when written), plus one row of logits; close() (or the end of a `with` block) frees them.

    save(path) writes the conversation and its KV cache to a file; resume=path starts from one, as
    if the conversation had never stopped (the numba backend only)."""

    def __init__(self, model, *, system: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stop=None,
                 ignore_eos: bool = False, context: int | None = None, resume=None, **sampling):
        self.model = model
        self.template = model.chat_template
        self.params = SamplingParams(**sampling)
        self.max_new_tokens = check_max_new_tokens(max_new_tokens)
        self.stop = check_stop(stop)
        self.ignore_eos = ignore_eos
        self.last_stats: GenerationStats | None = None
        self._answering = threading.Lock()  # one turn at a time
        if resume is None:
            self.sequence = model.sequence(context)
            self._reset(system)
        else:
            self._resume(resume, system, context)

    def _resume(self, path, system: str | None, context: int | None) -> None:
        saved = self.model.read_session(path)
        if system is not None:
            raise ValueError("a resumed session keeps the system prompt it was saved with")
        capacity = saved.ring["capacity"]
        if context is not None and context != capacity:
            raise ValueError(f"{path}: the session was saved with a context of {capacity} tokens, not {context}")
        self.sequence = self.model.sequence(capacity, sinks=saved.ring["sinks"])
        saved.restore_into(self.sequence.cache)
        self.system, self.messages, self._fed = saved.system, saved.messages, saved.fed
        if self.model.prefix_cache is not None:  # other sessions may start from its prompt too
            self.model.prefix_cache.offer(self.sequence.cache)

    def save(self, path) -> None:
        """Write the conversation, its KV cache's used slots and the model's identity to `path`,
        atomically (a failed save leaves an existing file as it was)."""
        with self._between_turns():
            if self.sequence is None:
                raise EdgephiError("this chat session is closed")
            self.model.write_session(path, self.sequence.cache, messages=self.messages, system=self.system,
                                     fed=self._fed)

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (keeping the system prompt unless a new one is given)."""
        with self._between_turns():
            self._reset(system)

    def _reset(self, system: str | None) -> None:
        if system is not None:
            self.system = system
        elif not hasattr(self, "system"):
            self.system = None
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._fed: list[int] = []  # every id this session put in its cache, in order
        if self.sequence is not None:
            self.sequence.reset()

    def close(self) -> None:
        """Give up the KV cache (to the model's ring pool, for the next session); the session cannot
        be used afterwards."""
        with self._between_turns():
            self.sequence = None

    @contextmanager
    def _between_turns(self):
        """Holds the turn lock: a reply still streaming would write into what changes here."""
        if not self._answering.acquire(blocking=False):
            raise EdgephiError("this chat session is answering (in another thread, or a reply not yet read to "
                               "the end); finish or close that reply first")
        try:
            yield
        finally:
            self._answering.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, text: str) -> Iterator[str]:
        """Stream the assistant's reply to a user message; the reply joins the conversation."""
        if not isinstance(text, str):
            raise ValueError("the user message must be a string")
        if self.sequence is None:
            raise EdgephiError("this chat session is closed")
        return self._turn(text)

    def _turn(self, text: str) -> Iterator[str]:
        """The turn runs as the reply is consumed: a send() never iterated changes nothing."""
        with self._between_turns():
            yield from self._answer(text)

    def _answer(self, text: str) -> Iterator[str]:
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.template.encode(messages, add_generation_prompt=True)
        self.messages = messages
        sequence = self.sequence
        common = 0
        for a, b in zip(ids, self._fed):
            if a != b:
                break
            common += 1
        # the template may re-render earlier turns differently (say, dropping a reasoning part),
        # and an interrupted reply can leave a token in the cache that _fed lacks: keep what
        # still matches, unless the ring has already overwritten what precedes it
        if common < sequence.next_pos and not sequence.truncate(common):
            common = 0
        if common == 0:
            sequence.reset()
            self._fed = []
            if self.system:
                system_ids = self.template.encode(self.messages[:1], add_generation_prompt=False)
                if ids[:len(system_ids)] == system_ids and len(system_ids) < sequence.capacity // 2:
                    sequence.keep_prefix(len(system_ids))  # the ring never drops the system prompt
        stats = self.last_stats = GenerationStats()
        tokens = token_stream(self.model, sequence, ids[common:], params=self.params,
                              max_new_tokens=self.max_new_tokens, stop=self.stop, ignore_eos=self.ignore_eos,
                              context_ids=self._fed[:common], stats=stats)
        reply = []
        try:
            for piece in text_stream(self.model.tokenizer, tokens, self.stop):
                reply.append(piece)
                yield piece
        finally:
            tokens.close()
            self._fed = self._fed[:common] + stats.fed
            self.messages.append({"role": "assistant", "content": "".join(reply)})

    def __call__(self, text: str) -> str:
        return "".join(self.send(text))
