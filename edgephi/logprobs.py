"""Log-probabilities of generated tokens, as OpenAI-style APIs report them: the chosen token's and
the likeliest alternatives', from the model's own distribution (before temperature or filters)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs


class TokenLogprobs(NamedTuple):
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob), likeliest first


def check_top_logprobs(k) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}")
    return k


def token_logprobs(logits: np.ndarray, token: int, k: int) -> TokenLogprobs:
    """log softmax(logits) at `token` and at the k largest logits (float64 sums, so a 200k-token
    vocabulary loses nothing to rounding)."""
    x = logits.astype(np.float64)
    top = x.max()
    log_total = top + np.log(np.exp(x - top).sum())
    ids = np.argpartition(-x, k - 1)[:k] if 0 < k < x.shape[0] else np.arange(x.shape[0] if k else 0)
    ids = ids[np.lexsort((ids, -x[ids]))]  # likeliest first, ties by id
    return TokenLogprobs(int(token), float(x[token] - log_total), [(int(i), float(x[i] - log_total)) for i in ids])
