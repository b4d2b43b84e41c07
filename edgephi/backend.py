"""The backend contract: what the generation API needs from a runtime (edgephi's numba kernels, onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # annotations only
    from .format import ModelConfig
    from .tokenizer import Tokenizer


class Cache(Protocol):
    """One sequence's state in a backend: its KV cache. Positions are absolute and count from 0."""

    @property
    def capacity(self) -> int:
        """Tokens the cache holds at once."""

    @property
    def next_pos(self) -> int:
        """Position of the next token fed (every token fed so far, kept or not)."""

    def reset(self) -> None:
        """Forget every token."""

    def truncate(self, n: int) -> bool:
        """Forget positions >= n; False (and nothing changed) when the cache can no longer cut there."""

    def keep_prefix(self, n: int) -> None:
        """Never drop the first n positions (a chat's system prompt) when the cache runs full."""


class Backend(Protocol):
    """A loaded model on one runtime. Many threads may share it: everything a step writes, except
    what the backend guards itself, lives in the Cache it is handed."""

    name: str  # "numba" or "onnxruntime"
    folder: Path  # what edgephi.load was given
    config: ModelConfig
    tokenizer: Tokenizer
    generation_config: dict  # generation.json
    generation_file: Path  # where generation_config came from (named in chat template errors)
    context: int  # default KV capacity of a new cache, in tokens
    kv_dtype: str  # "float16" or "float32"
    threads: int | None  # threads a step runs on; None: the runtime's own default
    kernels_s: float | None  # seconds load spent loading (or compiling) kernels; None: they load at the first step

    # figures for the bench, None where the backend has none (onnxruntime lays out its weights itself)
    @property
    def weights_file_bytes(self) -> int | None:
        """Size of the weights file the backend maps."""

    @property
    def weight_bytes_per_token(self) -> int | None:
        """Bytes of weights one decode step reads."""

    def new_cache(self, capacity: int, sinks: int) -> Cache:
        """An empty cache of `capacity` tokens whose first `sinks` positions stay when it runs full."""

    def feed(self, cache: Cache, tokens: np.ndarray, all_logits: bool, verify: bool = False) -> np.ndarray:
        """Append tokens (int64 (T,), checked) to `cache`; float32 logits (T, V), or (1, V) of the last.
        verify: the logits are to equal decode steps' (Sequence.feed)."""

    def step(self, cache: Cache, token: int) -> np.ndarray:
        """Append one checked token; float32 logits (1, V). The decode loop's hot path: the numba
        backend allocates nothing here and returns a row the next step overwrites."""

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """float32 (T, V) logits of checked ids (int64 (T,)) in a fresh context."""


def check_context(context, what: str = "context") -> int:
    if not isinstance(context, int) or isinstance(context, bool) or context < 2:
        raise ValueError(f"{what} must be an integer >= 2, got {context!r}")
    return context


def check_threads(threads) -> int | None:
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return threads


def check_tokens(tokens, vocab_size: int) -> np.ndarray:
    """tokens as int64 (T,), refused unless every id lies inside the embedding."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1 or len(tokens) == 0:
        raise ValueError("tokens must be a non-empty list of token ids")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size})")
    return tokens
