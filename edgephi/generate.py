"""Generation as stacked generators: token ids, then UTF-8-safe text pieces, then a string.

Every way a generation ends (an end-of-turn id, a stop string, max_new_tokens) is decided in
token_stream(), which records it in GenerationStats.finish_reason.
"""

from __future__ import annotations

import codecs
import time
from itertools import chain
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .logprobs import token_logprobs
from .lookup import propose
from .sampling import SamplingParams, accept_draft, sample
from .stops import StopMatcher, cut_at_stops

DEFAULT_MAX_NEW_TOKENS = 512  # the default reply length of the API, chat sessions and the CLI, in tokens


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of them, taken from the model's PrefixCache instead of computed
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (end-of-turn id or stop string), "length", or "" while running
    tokens: list = field(default_factory=list)  # generated ids
    fed: list = field(default_factory=list)  # ids this call put into the KV cache
    drafts_proposed: int = 0  # prompt lookup's guesses verified (SamplingParams.lookup)
    drafts_accepted: int = 0  # and taken
    logprobs: list = field(default_factory=list)  # a TokenLogprobs per generated id, when asked for

    @property
    def prefill_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first generated token comes out of the prefill step
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def _drafts(sequence, context: np.ndarray, k: int) -> list[int]:
    """Prompt-lookup drafts for the step after context, where the ring has room for them all
    unwrapped: a wrong draft is then forgotten without losing a position it overwrote."""
    k = min(k, sequence.capacity - sequence.next_pos - 1)
    return propose(context, k) if k > 0 else []


def check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    stop = tuple(stop)
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError("stop must be a string or a list of non-empty strings")
    return stop


def check_max_new_tokens(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}")
    return n


def token_stream(model, sequence, new_ids: list[int], *, params: SamplingParams, max_new_tokens: int,
                 stop: tuple[str, ...] = (), ignore_eos: bool = False, context_ids: list[int] | None = None,
                 stats: GenerationStats | None = None, logprobs: int | None = None,
                 constraint=None) -> Iterator[int]:
    """Feed new_ids into `sequence` (one of model's), then sample up to max_new_tokens ids.

    context_ids: every id already in the context before new_ids (for the repetition penalty).
    logprobs: record in stats.logprobs each generated id's log-probability under the model (before
    temperature and filters; under a constraint, of the tokens it allows) and the `logprobs`
    likeliest ids' (0: the chosen id's alone).
    constraint: a constrained.JsonConstraint: ids it rules out are never sampled, and the
    generation ends once its document is complete (no prompt-lookup drafts then).
    The token that ends the turn is not yielded and not fed; a token completing a stop string is.
    A fresh sequence takes what the model's PrefixCache holds of new_ids, and when the generation
    ends the cache is offered the sequence's prompt (after the reply: the copy never delays it).
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(new_ids)
    rng = np.random.default_rng(params.seed)
    eos = set() if ignore_eos else set(model.generation_config.get("eos_token_ids", []))
    n_vocab = model.tokenizer.n_vocab  # embedding rows past the tokenizer's ids are padding
    history = np.array(list(context_ids or []) + list(new_ids), dtype=np.int64)
    tail = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = StopMatcher(stop) if stop else None
    started = time.perf_counter()
    prefixes = model.prefix_cache
    if prefixes is not None and sequence.next_pos == 0:
        stats.cached_tokens = prefixes.restore(sequence.cache, np.asarray(new_ids, np.int64))
    rows = sequence.feed(new_ids[stats.cached_tokens:])[:, :n_vocab]
    prompt_end = sequence.next_pos
    stats.fed = list(new_ids)
    stats.prefill_seconds = time.perf_counter() - started
    started = time.perf_counter()
    generated = stats.tokens = []
    # rows[i]: the logits after the i-th token of the last step; drafts[i]: the token that step
    # fed after it on prompt lookup's guess, right if the i-th row picks it
    drafts, i = [], 0
    try:
        while len(generated) < max_new_tokens:
            previous = history if params.repetition_penalty != 1.0 else None
            if constraint is not None:
                constraint.mask(rows[i])
            if i < len(drafts):
                token = accept_draft(rows[i], drafts[i], params, rng, previous)
            else:
                token = sample(rows[i], params, rng, previous)
            if token in eos:
                stats.finish_reason = "stop"
                break
            generated.append(token)
            stats.generated_tokens = len(generated)
            if logprobs is not None:
                stats.logprobs.append(token_logprobs(rows[i], token, logprobs))
            if constraint is not None:
                constraint.advance(token)
                if constraint.complete:
                    stats.finish_reason = "stop"
            if stops:  # decided before yielding: a consumer that stops at the stop string closes us there
                if stops.feed(tail.decode(model.tokenizer.decode_bytes([token]))) is not None:
                    stats.finish_reason = "stop"
            yield token
            if stats.finish_reason or len(generated) == max_new_tokens:
                break
            if params.repetition_penalty != 1.0 or params.lookup:
                history = np.append(history, token)
            stats.fed.append(token)
            if i < len(drafts) and token == drafts[i]:
                stats.drafts_accepted += 1
                i += 1  # already in the cache, and its row is next
                continue
            if i < len(drafts):  # a wrong guess: the cache forgets it and the drafts after it
                sequence.truncate(sequence.next_pos - (len(drafts) - i))
            drafts, i = (_drafts(sequence, history, params.lookup) if constraint is None else []), 0
            if drafts:
                rows = sequence.feed([token] + drafts, all_logits=True, verify=True)[:, :n_vocab]
                stats.drafts_proposed += len(drafts)
            else:
                rows = sequence.step(token)[:, :n_vocab]
    finally:
        # the cache holds what stats.fed lists, as without drafts: a draft taken after the last
        # token the consumer got, or one the stop decision came after, is forgotten
        kept = prompt_end + len(stats.fed) - len(new_ids)
        if sequence.next_pos > kept:
            sequence.truncate(kept)
        stats.finish_reason = stats.finish_reason or "length"
        stats.decode_seconds = time.perf_counter() - started
        if prefixes is not None:
            prefixes.offer(sequence.cache)


def text_stream(tokenizer, ids: Iterable[int], stop: tuple[str, ...] = ()) -> Iterator[str]:
    """Text pieces of a token stream: never a partial UTF-8 character, never any part of a stop
    string (the text ends just before the first stop string)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = chain((decoder.decode(data) for data in _token_bytes(tokenizer, ids)),
                   (decoder.decode(b"", final=True) for _ in range(1)))  # a character left incomplete
    yield from cut_at_stops(pieces, stop)


def _token_bytes(tokenizer, ids: Iterable[int]) -> Iterator[bytes]:
    """Each token's bytes; with a tokenizer whose decode() drops the leading space its encoding's
    space prefix adds (strip_leading_space: SentencePiece), the first non-empty one loses it too."""
    strip = getattr(tokenizer, "strip_leading_space", False)
    for token in ids:
        data = tokenizer.decode_bytes([token])
        if strip and data:
            data, strip = data.removeprefix(b" "), False
        yield data
