"""Text <-> token ids with a tiktoken Encoding built from the model folder (nothing is downloaded).

Tokenizer is byte-level BPE (Phi-4, Llama 3, SmolLM); for a SentencePiece spec (Phi-3/3.5)
Tokenizer(spec) and Tokenizer.from_folder make its subclass SentencePieceTokenizer (tokenizer_spm.py).
Both have encode(text, allow_special), encode_parts, decode, decode_bytes, n_vocab, special_tokens
and strip_leading_space.
"""

from __future__ import annotations

from pathlib import Path

import tiktoken

from .errors import ModelFormatError
from .format import TOKENIZER_SPEC_FILE
from .tokenizer_files import TokenizerSpec


class Tokenizer:
    strip_leading_space = False  # decode() keeps the text as the tokens spell it

    def __new__(cls, spec: TokenizerSpec, where: str = "tokenizer"):
        """Tokenizer(spec) is a SentencePieceTokenizer for a SentencePiece spec."""
        if cls is Tokenizer and spec.sentencepiece is not None:
            from .tokenizer_spm import SentencePieceTokenizer

            cls = SentencePieceTokenizer
        return super().__new__(cls)

    def __init__(self, spec: TokenizerSpec, where: str = "tokenizer"):
        self.name = spec.name
        self.n_vocab = spec.n_vocab
        self.special_tokens = dict(spec.special_tokens)
        self._has_unknown_bytes = max(spec.ranks.values()) >= spec.n_vocab
        self._enc = build_encoding(spec, where)
        # The Encoding keeps the ranks dict only to pickle itself, which we never do; its Rust core
        # has its own copy. The dict is 6 MB for SmolLM2's 49k tokens, 34 MB for o200k's 200k.
        vars(self._enc).pop("_mergeable_ranks", None)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        return cls(TokenizerSpec.load(Path(folder)), str(Path(folder) / TOKENIZER_SPEC_FILE))

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Ids of `text`. Special-token text such as "<|im_end|>" stays ordinary text unless
        allow_special is true, so user input cannot forge chat structure."""
        if allow_special:
            ids = self._enc.encode(text, allowed_special="all")
        else:
            ids = self._enc.encode_ordinary(text)
        if self._has_unknown_bytes:
            ids = [i for i in ids if i < self.n_vocab]
        return ids

    def encode_parts(self, parts: list[str]) -> list[int]:
        """Ids of a text cut at its special tokens: parts alternate ordinary text and special-token
        text (text, special, text, ..., text), as a chat template's renderer finds them."""
        ids: list[int] = []
        for k, part in enumerate(parts):
            ids += [self.special_tokens[part]] if k % 2 else self.encode(part)
        return ids

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of `ids`; an id the vocabulary has no token for (a hole some vocabularies
        leave below n_vocab) decodes to nothing rather than failing mid-reply."""
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, ValueError, OverflowError):
            return b"".join(self._enc.decode_single_token_bytes(i) for i in ids if self._has_token(i))

    def _has_token(self, token: int) -> bool:
        try:
            self._enc.decode_single_token_bytes(token)
        except (KeyError, ValueError, OverflowError):
            return False
        return True

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def build_encoding(spec: TokenizerSpec, where: str, special_tokens: dict[str, int] | None = None) -> tiktoken.Encoding:
    """tiktoken's Encoding (with the spec's special tokens unless told otherwise); its Rust core
    reports some bad input by panicking, which surfaces as pyo3's PanicException, a BaseException
    that `except Exception` would miss."""
    try:
        return tiktoken.Encoding(name=spec.name, pat_str=spec.pat_str, mergeable_ranks=spec.ranks,
                                 special_tokens=spec.special_tokens if special_tokens is None else special_tokens)
    except Exception as exc:
        raise ModelFormatError(f"{where}: tiktoken cannot build this tokenizer ({str(exc)[:200]})") from None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise ModelFormatError(f"{where}: tiktoken cannot build this tokenizer ({str(exc)[:200]})") from None

