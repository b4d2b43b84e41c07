"""SentencePiece BPE with byte fallback (Phi-3/3.5): text <-> ids as llama.cpp and Hugging Face
tokenize, on a tiktoken Encoding whose ranks tokenizer_spm_build.py made.

Encoding a text fragment: " " -> "▁" and a leading "▁" (SentencePiece's space prefix), tiktoken's
BPE over the split pieces, then each rank -> its ids (a partial character -> its byte tokens).
Special tokens (allow_special) are cut out first; each may swallow the whitespace beside it
(lstrip/rstrip: llama.cpp sets rstrip on Phi-3's chat tokens, tokenizer.json carries its own
flags), and each text fragment between them gets its own space prefix, as llama.cpp and
Hugging Face's normalizer do.
"""

from __future__ import annotations

import re

import numpy as np

from .tokenizer import Tokenizer, build_encoding
from .tokenizer_files import TokenizerSpec

SPACE = "▁"


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, spec: TokenizerSpec, where: str = "tokenizer"):  # (replaces Tokenizer's)
        t = spec.sentencepiece
        self.name = spec.name
        self.n_vocab = spec.n_vocab
        self.special_tokens = dict(spec.special_tokens)
        # decode() drops the one leading space the prefix added, as llama.cpp and Hugging Face's decoder do
        self.strip_leading_space = t.strip_leading_space
        self._enc = build_encoding(spec, where, special_tokens={})
        vars(self._enc).pop("_mergeable_ranks", None)  # its Rust core keeps its own copy
        lengths = np.array([len(ids) for ids in t.rank_ids], dtype=np.int64)  # (R,)
        self._flat = np.array([i for ids in t.rank_ids for i in ids], dtype=np.int64)  # (sum lengths,)
        self._start = np.cumsum(lengths) - lengths  # (R,) where each rank's ids begin in _flat
        self._length = lengths
        self._first = self._flat[self._start]  # (R,) the id of each rank that stands for one
        self._bytes = _token_bytes(t.pieces, t.byte_tokens)  # (V,) each id's bytes
        self._lstrip, self._rstrip, self._strip_chars = set(t.lstrip), set(t.rstrip), t.strip_chars
        self._prefix, self._unless_space = t.space_prefix, t.prefix_unless_space
        specials = sorted(self.special_tokens, key=len, reverse=True)  # longest match first
        self._special_re = re.compile("|".join(map(re.escape, specials)) or "(?!)")

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Ids of `text`. Special-token text such as "<|user|>" stays ordinary text unless
        allow_special is true, so user input cannot forge chat structure."""
        if not allow_special:
            return self._encode_text(text, at_start=True)
        parts, start = [], 0
        for match in self._special_re.finditer(text):
            parts += [text[start:match.start()], match.group()]
            start = match.end()
        return self.encode_parts(parts + [text[start:]])

    def encode_parts(self, parts: list[str]) -> list[int]:
        """Ids of a text cut at its special tokens: parts alternate ordinary text and special-token
        text (text, special, text, ..., text), as a chat template's renderer finds them."""
        texts, specials = list(parts[0::2]), parts[1::2]
        starts = np.cumsum([0] + [len(p) for p in parts])[0::2].tolist()  # where each text begins
        for k, special in enumerate(specials):
            if special in self._lstrip:
                texts[k] = texts[k].rstrip(self._strip_chars)
            if special in self._rstrip and k + 1 < len(texts):
                kept = texts[k + 1].lstrip(self._strip_chars)
                starts[k + 1] += len(texts[k + 1]) - len(kept)
                texts[k + 1] = kept
        ids: list[int] = []
        for k, text in enumerate(texts):
            if text:  # an empty fragment gets no space prefix either
                ids += self._encode_text(text, at_start=starts[k] == 0)
            if k < len(specials):
                ids.append(self.special_tokens[specials[k]])
        return ids

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        prefix = (self._prefix == "every" or (self._prefix == "first" and at_start)) and not (
            self._unless_space and text[0] in (" ", SPACE))
        ranks = np.array(self._enc.encode_ordinary((SPACE if prefix else "") + text.replace(" ", SPACE)),
                         dtype=np.int64)  # (T,)
        lengths = self._length[ranks]
        if (lengths == 1).all():
            return self._first[ranks].tolist()
        # a character the vocabulary lacks: its partial ranks stand for several byte tokens each
        ends = np.cumsum(lengths)  # (T,)
        within = np.arange(ends[-1]) - np.repeat(ends - lengths, lengths)
        return self._flat[np.repeat(self._start[ranks], lengths) + within].tolist()

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of `ids`: byte tokens as their byte, other tokens as their text with "▁" as
        a space; an id outside the vocabulary decodes to nothing rather than failing mid-reply."""
        table, n = self._bytes, self.n_vocab
        return b"".join([table[i] for i in ids if 0 <= i < n])

    def decode(self, ids: list[int]) -> str:
        text = self.decode_bytes(ids).decode("utf-8", errors="replace")
        return text[1:] if self.strip_leading_space and text.startswith(" ") else text


def _token_bytes(pieces: list[str], byte_tokens: list[int]) -> list[bytes]:
    out = [p.replace(SPACE, " ").encode("utf-8", errors="replace") for p in pieces]
    for b, tid in enumerate(byte_tokens):
        out[tid] = bytes([b])
    return out
