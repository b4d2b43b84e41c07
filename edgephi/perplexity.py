"""Perplexity of a model on a text, and its KL divergence from a reference model on the same tokens,
by llama.cpp's method (llama-perplexity, and its --kl-divergence mode):

- the text is tokenized whole (with BOS where the vocabulary adds one) and cut into non-overlapping
  chunks of `ctx` tokens, each computed in a fresh context, its first token replaced by BOS where
  the vocabulary adds one;
- only the second half of each chunk is scored, so every scored token has at least ctx/2 tokens
  of context: the logits at positions ctx/2 .. ctx-2 predict the tokens after them.

KL(base || model) is computed exactly in float64 over the whole vocabulary (llama.cpp stores the
base's log-probabilities in 16 bits and skips those below e^-16).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .api import LanguageModel

ROWS_PER_BLOCK = 16  # logits rows widened to float64 at a time: 25 MB at Phi-4-mini's 200k vocabulary


@dataclass
class KlFigures:
    """How far a model's next-token distributions lie from the base model's on the scored tokens."""
    base_ppl: float
    base_ppl_err: float
    ppl_ratio: float  # PPL(model) / PPL(base)
    ppl_ratio_err: float
    kl_mean: float  # mean KL(base || model), nats per token
    kl_err: float
    kl_median: float
    kl_p99: float
    kl_max: float
    rms_dp: float  # RMS over tokens of p_model(next) - p_base(next)
    rms_dp_err: float
    same_top1: float  # share of positions where both models' most likely token is the same
    same_top1_err: float


@dataclass
class PerplexityReport:
    ctx: int
    chunks: int
    scored_tokens: int  # chunks x (ctx - 1 - ctx // 2)
    text_tokens: int
    ppl: float
    ppl_err: float
    kl: KlFigures | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class TokenScores:
    """Per scored token: the model's negative log-likelihood of the next token and, against a base
    model, the base's, the KL divergence, Δp and whether the top tokens agree."""

    def __init__(self, count: int, with_base: bool):
        self.nll = np.zeros(count)
        self.base_nll = np.zeros(count) if with_base else None
        self.kl = np.zeros(count) if with_base else None
        self.dp = np.zeros(count) if with_base else None
        self.same_top = np.zeros(count, bool) if with_base else None

    def add(self, at: int, logits: np.ndarray, targets: np.ndarray, base_logits: np.ndarray | None) -> None:
        """Rows [at, at + len(targets)) from float32 (n, V) logits predicting `targets`."""
        rows = np.arange(len(targets))
        for start in range(0, len(targets), ROWS_PER_BLOCK):
            block = slice(start, start + ROWS_PER_BLOCK)
            out = slice(at + start, at + min(start + ROWS_PER_BLOCK, len(targets)))
            picked = rows[block] - start, targets[block]
            logp = log_softmax(logits[block])
            self.nll[out] = -logp[picked]
            if base_logits is None:
                continue
            base_logp = log_softmax(base_logits[block])
            self.base_nll[out] = -base_logp[picked]
            self.kl[out] = np.maximum((np.exp(base_logp) * (base_logp - logp)).sum(axis=1), 0.0)
            self.dp[out] = np.exp(logp[picked]) - np.exp(base_logp[picked])
            self.same_top[out] = logits[block].argmax(axis=1) == base_logits[block].argmax(axis=1)

    def report(self, ctx: int, chunks: int, text_tokens: int) -> PerplexityReport:
        ppl, ppl_err = _exp_mean(self.nll)
        report = PerplexityReport(ctx, chunks, len(self.nll), text_tokens, ppl, ppl_err)
        if self.kl is not None:
            base_ppl, base_ppl_err = _exp_mean(self.base_nll)
            ratio, ratio_err = _exp_mean(self.nll - self.base_nll)
            kl_mean, kl_err = _mean(self.kl)
            dp2, dp2_err = _mean(self.dp ** 2)
            rms_dp = math.sqrt(dp2)
            same, n = float(self.same_top.mean()), len(self.same_top)
            report.kl = KlFigures(
                base_ppl, base_ppl_err, ratio, ratio_err, kl_mean, kl_err,
                float(np.median(self.kl)), float(np.percentile(self.kl, 99)), float(self.kl.max()),
                rms_dp, dp2_err / (2 * rms_dp) if rms_dp > 0 else 0.0,
                same, math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0)
        return report


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float32 (n, V) logits."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def _mean(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error."""
    n = len(values)
    mean = float(values.mean())
    return mean, float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def _exp_mean(values: np.ndarray) -> tuple[float, float]:
    """exp(mean) and its standard error (to first order), as llama.cpp gives PPL +/- ..."""
    mean, err = _mean(values)
    return math.exp(mean), math.exp(mean) * err


def text_chunks(model: LanguageModel, text: str, ctx: int, chunks: int | None, name: str) -> tuple[np.ndarray, int]:
    """(chunks, ctx) int64 token ids of `text` (named `name` in errors) and the text's token count."""
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 4:
        raise ValueError(f"the context must be an integer of at least 4 tokens, got {ctx!r}")
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"the number of chunks must be a positive integer, got {chunks!r}")
    if not text.strip():
        raise ValueError(f"{name}: the text is empty")
    ids = model.tokenizer.encode(text)
    bos = _bos(model)
    if bos is not None:
        ids = [bos] + ids
    if len(ids) < 2 * ctx:
        raise ValueError(f"{name}: the text is {len(ids)} tokens long; a context of {ctx} needs at least "
                         f"{2 * ctx} (two chunks)")
    n = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
    out = np.asarray(ids[:n * ctx], np.int64).reshape(n, ctx)
    if bos is not None:
        out[:, 0] = bos
    return out, len(ids)


def _bos(model: LanguageModel) -> int | None:
    """The BOS id when the vocabulary adds one to a text, as llama.cpp's add_bos."""
    generation = model.generation_config
    return generation.get("bos_token_id") if generation.get("add_bos_token") else None


def check_same_vocabulary(model: LanguageModel, base: LanguageModel, name: str, base_name: str) -> None:
    """KL divergence compares distributions over the same tokens: the vocabularies must agree in size and
    cut the text the same way."""
    if model.config.vocab_size != base.config.vocab_size:
        raise ValueError(f"{base_name}: its vocabulary differs from {name}'s "
                         f"({base.config.vocab_size} vs {model.config.vocab_size} tokens)")
    if _bos(model) != _bos(base):
        raise ValueError(f"{base_name}: its vocabulary differs from {name}'s (BOS {_bos(base)} vs {_bos(model)})")


def evaluate(model: LanguageModel, text: str, *, ctx: int = 512, chunks: int | None = None,
             base: LanguageModel | None = None, name: str = "text", model_name: str = "the model",
             base_name: str = "the base model",
             on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityReport:
    """Perplexity of `model` on `text`, and with `base` the KL figures of model against base.
    on_chunk(done, total, perplexity so far) after each chunk."""
    tokens, text_tokens = text_chunks(model, text, ctx, chunks, name)
    if base is not None:
        check_same_vocabulary(model, base, model_name, base_name)
        base_tokens, _ = text_chunks(base, text, ctx, chunks, name)
        if not np.array_equal(base_tokens, tokens):
            raise ValueError(f"{base_name}: its vocabulary differs from {model_name}'s (it cuts the text into "
                             "other tokens)")
    first = ctx // 2
    per_chunk = ctx - 1 - first
    scores = TokenScores(len(tokens) * per_chunk, base is not None)
    sequences = [m.sequence(context=ctx) for m in ([model] if base is None else [model, base])]
    for i, chunk in enumerate(tokens):
        logits = []
        for sequence in sequences:
            sequence.reset()
            sequence.feed(chunk[:first])
            logits.append(sequence.feed(chunk[first:], all_logits=True)[:per_chunk])
        scores.add(i * per_chunk, logits[0], chunk[first + 1:], logits[1] if base is not None else None)
        if on_chunk is not None:
            on_chunk(i + 1, len(tokens), math.exp(scores.nll[:(i + 1) * per_chunk].mean()))
    return scores.report(ctx, len(tokens), text_tokens)


def read_text(path) -> str:
    """A UTF-8 text file, with a one-line error naming it when it is not one."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
