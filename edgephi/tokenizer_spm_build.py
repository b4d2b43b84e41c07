"""A SentencePiece BPE vocabulary (Phi-3/3.5) -> the tiktoken ranks and tables tokenizer_spm.py encodes with.

Used by the converter (convert/tokenizers.py reads GGUF or tokenizer.json into a SentencePieceVocab).
SentencePiece BPE (llama.cpp's llm_tokenizer_spm, Hugging Face's BPE with byte fallback) starts from
the UTF-8 characters and merges the adjacent pair whose concatenation is the piece of highest
priority (ties: leftmost); a character the vocabulary lacks becomes its byte tokens. tiktoken starts
from bytes and merges the adjacent pair whose concatenation has the lowest rank (ties: leftmost). So
the ranks here are: every single byte and every proper prefix of a vocabulary character's UTF-8
(lowest: characters assemble first, and a partial character never merges with a neighbour), then the
characters, then the pieces by priority. rank_ids maps a rank back to ids: a piece to its id, a
partial character left over to the byte tokens of its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tiktoken

from .errors import EdgephiError
from .files import brief
from .tokenizer_files import SentencePieceTables, TokenizerSpec

SPACE = "▁"  # U+2581, SentencePiece's space


@dataclass
class SentencePieceVocab:
    """A SentencePiece BPE vocabulary as the converter reads it."""
    name: str
    pieces: list[str]  # id -> text ("" for an id the vocabulary leaves empty)
    chars: dict[str, int]  # the single characters BPE starts from -> id
    merge_order: list[int]  # ids of the pieces BPE may form (two characters or more), highest priority first
    byte_tokens: list[int]  # the ids of <0x00> .. <0xFF>
    special: dict[str, int]  # split out of text when special tokens are allowed
    lstrip: set[str] = field(default_factory=set)
    rstrip: set[str] = field(default_factory=set)
    strip_chars: str = " \t\n\v\f\r"
    space_prefix: str = "every"
    prefix_unless_space: bool = False
    split_on_space: bool = False  # Metaspace(split=True): every "▁" starts a new word
    strip_leading_space: bool = True  # the decoder drops the space that starts the text


def refuse(where: str, reason: str) -> EdgephiError:
    return EdgephiError(f"{where}: SentencePiece vocabulary not supported: {reason}")


def order_from_scores(pieces: list[str], ids: list[int], scores: list[float], where: str) -> list[int]:
    """ids by descending score, as llama.cpp merges. It breaks a tie leftmost-first; for runs of one
    character (Phi-3's whitespace runs, all at -1e9) ranking longer runs first does the same, as
    the leftmost run grows; other ties are refused."""
    tied: dict[float, list[int]] = {}
    for i in ids:
        tied.setdefault(scores[i], []).append(i)
    for score, group in tied.items():
        if len(group) > 1 and len({c for i in group for c in pieces[i]}) > 1:
            raise refuse(where, f"pieces {brief(pieces[group[0]])} and {brief(pieces[group[1]])} have the same "
                                f"score {score}, a tie edgephi cannot break as llama.cpp does")
    return sorted(ids, key=lambda i: (-scores[i], -len(pieces[i])))


def order_from_merges(plain: dict[str, int], chars: dict[str, int], merges: list[tuple[str, str]],
                      where: str) -> list[int]:
    """The ids of the pieces the merges make (plain: the vocabulary but its added tokens), in the
    order of each one's first merge. tiktoken ranks pieces, Hugging Face ranks pairs: they agree
    when a piece's merges are consecutive in the list and the list holds every split of a piece
    into two pieces it can form. Runs of one character may interleave: transformers lists Phi-3's
    whitespace runs so that their first merges put longer runs first, as llama.cpp's leftmost
    growth does (the tests check runs of 1-80 spaces against Hugging Face)."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    pairs = set(merges)
    for k, (left, right) in enumerate(merges):
        piece = left + right
        if left not in plain or right not in plain or piece not in plain:
            raise refuse(where, f"merge {k} ({brief(left)} {brief(right)}) joins or makes a token that is "
                                 "not an ordinary vocabulary piece")
        if piece in last and last[piece] != k - 1 and not _is_run(piece):
            raise refuse(where, f"the merges making {brief(piece)} are not consecutive (merge {k}), "
                                 "so tiktoken's ranks cannot order them")
        first.setdefault(piece, k)
        last[piece] = k
    formable = set(chars) | set(first)
    for piece in first:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in formable and right in formable and (left, right) not in pairs:
                raise refuse(where, f"the merges lack {brief(left)} + {brief(right)} -> {brief(piece)}, "
                                     "which tiktoken's ranks would make")
    return [plain[p] for p in sorted(first, key=first.get)]


def build_spec(vocab: SentencePieceVocab, where: str) -> TokenizerSpec:
    bad = next((p for p in vocab.pieces if not _is_unicode(p)), None)
    if bad is not None:
        raise refuse(where, f"token {brief(bad)} is not valid Unicode (it holds a lone surrogate)")
    partial = _partial_characters(vocab.chars)
    wide = [c for c in vocab.chars if len(c.encode()) > 1]  # (ASCII characters are single bytes)
    formed = _formed_by_bpe(vocab, partial, wide, where)
    merge_order = [i for i in vocab.merge_order if i in formed]
    tokens = ([bytes([b]) for b in range(256)] + partial + [c.encode() for c in wide]
              + [vocab.pieces[i].encode() for i in merge_order])
    rank_ids = ([_byte_ids(b, vocab) for b in range(256)] + [[vocab.byte_tokens[b] for b in p] for p in partial]
                + [[vocab.chars[c]] for c in wide] + [[i] for i in merge_order])
    tables = SentencePieceTables(vocab.pieces, vocab.byte_tokens, rank_ids, sorted(vocab.lstrip),
                                 sorted(vocab.rstrip), vocab.strip_chars, vocab.space_prefix,
                                 vocab.prefix_unless_space, vocab.strip_leading_space)
    pattern = split_pattern([vocab.pieces[i] for i in merge_order], vocab.split_on_space)
    return TokenizerSpec(vocab.name, pattern, _ranks(tokens, where), dict(vocab.special), len(vocab.pieces), tables)


def _ranks(tokens: list[bytes], where: str) -> dict[bytes, int]:
    ranks = {token: rank for rank, token in enumerate(tokens)}
    if len(ranks) != len(tokens):
        raise refuse(where, "two pieces have the same text")
    return ranks


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_run(piece: str) -> bool:
    return len(set(piece)) == 1


def _partial_characters(chars: dict[str, int]) -> list[bytes]:
    """The proper prefixes, two bytes or longer, of the characters' UTF-8 (single bytes have ranks already)."""
    prefixes = {c.encode()[:k] for c in chars for k in range(2, len(c.encode()))}
    return sorted(prefixes)


def _byte_ids(b: int, vocab: SentencePieceVocab) -> list[int]:
    """A byte left alone: its character's piece if it is an ASCII character the vocabulary has,
    else its byte token."""
    char = chr(b) if b < 0x80 else None
    return [vocab.chars[char]] if char in vocab.chars else [vocab.byte_tokens[b]]


def _formed_by_bpe(vocab: SentencePieceVocab, partial: list[bytes], wide: list[str], where: str) -> set[int]:
    """The pieces BPE forms from their own text. tiktoken returns a split piece found among its
    ranks whole, without BPE, so a piece BPE never forms must leave the ranks; leaving changes
    nothing else: a piece not formed from its own text is formed in no context (its characters
    evolve alone until one merges across its edge, and then it cannot form)."""
    pieces = [vocab.pieces[i] for i in vocab.merge_order]
    if not pieces:
        return set()
    used = set("".join(pieces))
    separator = next((chr(c) for c in range(0x20) if chr(c) not in used), None)
    if separator is None:
        raise refuse(where, "every control character is part of a piece")
    tokens = [bytes([b]) for b in range(256)] + partial + [c.encode() for c in wide] + [p.encode() for p in pieces]
    ranks = _ranks(tokens, where)
    enc = tiktoken.Encoding(name="reachability", pat_str=f"[^{_escape(separator)}]*{_escape(separator)}",
                            mergeable_ranks=ranks, special_tokens={})
    out = np.array(enc.encode_ordinary(separator.join(pieces) + separator), dtype=np.int64)
    ends = np.flatnonzero(out == ranks[separator.encode()])
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    first = len(tokens) - len(pieces)  # the rank of the first piece
    formed = (ends - starts == 1) & (out[starts] == first + np.arange(len(pieces)))
    return {i for i, ok in zip(vocab.merge_order, formed) if ok}


def split_pattern(pieces: list[str], split_on_space: bool) -> str:
    """A tiktoken split regex that never cuts where a merge could happen (its BPE time grows with
    the square of a piece's length): a boundary next to a character in no piece of two or more
    characters is safe, and so is one before a run of "▁" after another character when every "▁"
    in a piece is in its leading run (as in Phi-3's vocabulary; Metaspace(split=True) forces these)."""
    multi = [p for p in pieces if len(p) > 1]
    joined = set().union(*map(set, multi)) if multi else set()
    leading_runs_only = split_on_space or all(SPACE not in p.lstrip(SPACE) for p in multi)
    if SPACE in joined and leading_runs_only and joined != {SPACE}:
        m = _char_class(joined - {SPACE})
        if split_on_space:
            return f"{SPACE}?[{m}]+|[^{m}]"
        return f"{SPACE}*[{m}]+|{SPACE}+|[^{m}{SPACE}]"
    if not joined or (split_on_space and joined == {SPACE}):
        return r"(?s:.)"
    m = _char_class(joined)
    return f"[{m}]+|[^{m}]"


def _char_class(chars: set[str]) -> str:
    """The inside of a regex character class holding exactly `chars`, as \\x{..} ranges."""
    codes = sorted(map(ord, chars))
    parts, start = [], 0
    for i in range(1, len(codes) + 1):
        if i == len(codes) or codes[i] != codes[i - 1] + 1:
            lo, hi = codes[start], codes[i - 1]
            parts.append(f"\\x{{{lo:x}}}" if lo == hi else f"\\x{{{lo:x}}}-\\x{{{hi:x}}}")
            start = i
    return "".join(parts)


def _escape(c: str) -> str:
    return f"\\x{{{ord(c):x}}}"
