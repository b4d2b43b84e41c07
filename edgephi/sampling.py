"""Choosing the next token: pure functions over a logits vector, with the RNG passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .lookup import MAX_DRAFT


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 picks the most likely token and draws no random number
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches p
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the context (CTRL's rule)
    seed: int | None = None
    lookup: int = 0  # draft up to this many tokens by prompt lookup (lookup.py), verified in one step

    def __post_init__(self):
        def number(v):
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        checks = [
            ("temperature", number(self.temperature) and self.temperature >= 0, "a number >= 0"),
            ("top_k", integer(self.top_k) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", number(self.min_p) and 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", number(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0"),
            ("seed", self.seed is None or integer(self.seed), "an integer or None"),
            ("lookup", integer(self.lookup) and 0 <= self.lookup <= MAX_DRAFT, f"an integer in [0, {MAX_DRAFT}]"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")


def apply_repetition_penalty(logits: np.ndarray, previous: np.ndarray, penalty: float) -> np.ndarray:
    """Divide positive logits (multiply negative ones) of tokens already seen by `penalty`."""
    if penalty == 1.0 or len(previous) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(previous)
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.shape[0]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    if p >= 1.0:
        return logits
    order = np.argsort(-logits)
    probs = softmax(logits[order])
    keep = np.cumsum(probs) - probs < p  # keep a token while the mass before it is below p
    out = np.full_like(logits, -np.inf)
    out[order[keep]] = logits[order[keep]]
    return out


def filter_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    if min_p <= 0.0:
        return logits
    threshold = logits.max() + math.log(min_p)  # p_i >= min_p * p_max, in log space
    return np.where(logits >= threshold, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The probabilities (float64) sample() draws from when temperature > 0."""
    logits = logits.astype(np.float64) / params.temperature
    logits = filter_min_p(filter_top_p(filter_top_k(logits, params.top_k), params.top_p), params.min_p)
    return softmax(logits)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           previous: np.ndarray | None = None) -> int:
    """The next token id from logits (V,), given the ids already in the context."""
    if previous is not None:
        logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    probs = distribution(logits, params)
    return int(rng.choice(probs.shape[0], p=probs))


def accept_draft(logits: np.ndarray, draft: int, params: SamplingParams, rng: np.random.Generator,
                 previous: np.ndarray | None = None) -> int:
    """The next token when `draft` was proposed for it: speculative sampling's rule for a draft
    that is certain (q(draft) = 1), so the token's distribution is exactly sample()'s. The draft
    is kept with probability p(draft); otherwise a token is drawn from p without the draft,
    renormalised. Greedy: the most likely token, draft or not."""
    if previous is not None:
        logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    probs = distribution(logits, params)
    if rng.random() < probs[draft]:
        return draft
    probs[draft] = 0.0
    return int(rng.choice(probs.shape[0], p=probs / probs.sum()))
