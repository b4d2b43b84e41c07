"""Prompt-lookup drafts: the tokens that followed the most recent earlier occurrence of the
context's last n-gram (n from MAX_NGRAM down to MIN_NGRAM), as llama.cpp's --lookup and transformers'
prompt_lookup_num_tokens propose them. Summaries, code edits and quotes repeat their input, so the
drafts are often right, and one forward step verifies them all (generate.token_stream)."""

from __future__ import annotations

import numpy as np

MAX_NGRAM = 3
MIN_NGRAM = 2  # a lone repeated token predicts too little: its drafts cost a wider step, rarely paid back
# Drafts per step at most: a verify step of the last token plus its drafts stays below the prefill
# panels' step size (matmul.PANEL_MIN_TOKENS; not imported, to keep numba out of the sampling
# module's imports), so it takes the row tiles and its logits are decode's bit for bit.
MAX_DRAFT = 6


def propose(context: np.ndarray, k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to k ids that followed the latest earlier match of context's last n ids (longest n first)."""
    size = context.shape[0]
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        # windows context[s:s + n] for s < size - n: each has at least one id after it
        match = np.ones(size - n, dtype=bool)
        for j in range(n):
            match &= context[j:size - n + j] == context[size - n + j]
        found = np.flatnonzero(match)
        if found.size:
            start = int(found[-1]) + n
            return [int(t) for t in context[start:start + k]]
    return []
