"""Text <-> token ids with a tiktoken Encoding built from the model folder (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import tiktoken

from .tokenizer_files import TokenizerSpec


class Tokenizer:
    def __init__(self, spec: TokenizerSpec):
        self.name = spec.name
        self.n_vocab = spec.n_vocab
        self.special_tokens = dict(spec.special_tokens)
        self._has_unknown_bytes = max(spec.ranks.values()) >= spec.n_vocab
        self._enc = tiktoken.Encoding(name=spec.name, pat_str=spec.pat_str, mergeable_ranks=spec.ranks,
                                      special_tokens=spec.special_tokens)
        # The Encoding keeps the ranks dict only to pickle itself, which we never do; its Rust core
        # has its own copy. The dict is 6 MB for SmolLM2's 49k tokens, 34 MB for o200k's 200k.
        vars(self._enc).pop("_mergeable_ranks", None)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        return cls(TokenizerSpec.load(Path(folder)))

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

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self._enc.decode_bytes(ids)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")

