"""The tokenizer as stored in a model folder: tiktoken ranks plus a JSON spec.

Two kinds: byte-level BPE (Phi-4, Llama 3, SmolLM), whose ranks are the token ids; and SentencePiece
BPE with byte fallback (Phi-3/3.5), whose ranks are merge priorities that SentencePieceTables maps
to ids. Shared by the converter (which writes it) and the runtime (which builds a tiktoken Encoding
from it).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFormatError
from .files import Fields, read_bytes, read_json
from .format import TOKENIZER_RANKS_FILE, TOKENIZER_SPEC_FILE

SPEC_VERSION = 2  # the newest this edgephi reads; byte-level specs are still written as version 1
SENTENCEPIECE = "sentencepiece-bpe"  # the spec's "kind"; absent for byte-level BPE
SPACE_PREFIXES = ("every", "first", "none")
MAX_IDS = 1 << 22  # token ids; the largest vocabularies in use have about 256k
MAX_RANKS_BYTES = 64 << 20  # o200k's file is 3.6 MB


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies (tokenizer.json,
    GGUF gpt2) spell their tokens in: printable bytes stand for themselves, the rest for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}  # printable character -> byte


@dataclass
class SentencePieceTables:
    """What a SentencePiece BPE vocabulary adds to its tiktoken ranks (tokenizer_spm.py uses it).

    The ranks order merges: the single bytes and the partial UTF-8 characters first, then the
    characters, then the pieces by priority; rank_ids maps each rank to the ids it stands for."""
    pieces: list[str]  # id -> the vocabulary's text: "▁" for a space, "<0x0A>" for a byte token
    byte_tokens: list[int]  # the ids of <0x00> .. <0xFF>
    rank_ids: list[list[int]]  # rank -> one id, or a partial character's byte tokens
    lstrip: list[str] = field(default_factory=list)  # special tokens that swallow the whitespace before them
    rstrip: list[str] = field(default_factory=list)  # ... and after them
    strip_chars: str = " \t\n\v\f\r"  # the whitespace they swallow (llama.cpp: C isspace)
    space_prefix: str = "every"  # which text fragments get a leading "▁": every, the first (at offset 0), none
    prefix_unless_space: bool = False  # no "▁" before a fragment that starts with a space (Metaspace)
    strip_leading_space: bool = True  # decoding drops the space that starts the text (the prefix's)

    def to_json(self) -> dict:
        return {"kind": SENTENCEPIECE, "pieces": self.pieces, "byte_tokens": self.byte_tokens,
                "rank_ids": [ids[0] if len(ids) == 1 else ids for ids in self.rank_ids],
                "lstrip": self.lstrip, "rstrip": self.rstrip, "strip_chars": self.strip_chars,
                "space_prefix": self.space_prefix, "prefix_unless_space": self.prefix_unless_space,
                "strip_leading_space": self.strip_leading_space}

    @classmethod
    def from_json(cls, f: Fields) -> "SentencePieceTables":
        pieces = f.array("pieces")
        if not all(isinstance(p, str) for p in pieces):
            f.fail("pieces", "must be an array of strings")
        ids = [_ids(entry, f) for entry in f.array("rank_ids")]
        return cls(pieces, [_id(i, f, "byte_tokens") for i in f.array("byte_tokens")], ids,
                   _strings(f, "lstrip"), _strings(f, "rstrip"), f.string("strip_chars"),
                   f.string("space_prefix"), f.boolean("prefix_unless_space"), f.boolean("strip_leading_space"))

    def check(self, spec: "TokenizerSpec", fail) -> None:
        """Ids inside the vocabulary, one rank_ids entry per rank, and no special token that
        ordinary text could produce."""
        n = spec.n_vocab
        if len(self.pieces) != n:
            fail(f"pieces holds {len(self.pieces)} tokens, n_vocab is {n}")
        if len(self.byte_tokens) != 256 or not all(0 <= i < n for i in self.byte_tokens):
            fail(f"byte_tokens must be 256 ids in [0, {n})")
        if len(self.rank_ids) != len(spec.ranks):
            fail(f"rank_ids has {len(self.rank_ids)} entries for {len(spec.ranks)} ranks")
        produced = {i for ids in self.rank_ids for i in ids}
        if not all(0 <= i < n for i in produced):
            fail(f"rank_ids holds an id outside [0, {n})")
        for text, tid in spec.special_tokens.items():
            if tid in produced:
                fail(f"special token {text!r} has id {tid}, which ordinary text can produce")
        unknown = [t for t in self.lstrip + self.rstrip if t not in spec.special_tokens]
        if unknown:
            fail(f"strip flag on {unknown[0]!r}, which is not a special token")
        if self.space_prefix not in SPACE_PREFIXES:
            fail(f"space_prefix must be one of {', '.join(SPACE_PREFIXES)}, got {self.space_prefix!r}")


def _id(value, f: Fields, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_IDS:
        f.fail(key, f"must hold token ids, got {value!r}"[:200])
    return value


def _ids(entry, f: Fields) -> list[int]:
    if isinstance(entry, list) and entry:
        return [_id(i, f, "rank_ids") for i in entry]
    return [_id(entry, f, "rank_ids")]


def _strings(f: Fields, key: str) -> list[str]:
    values = f.array(key)
    if not all(isinstance(v, str) for v in values):
        f.fail(key, "must be an array of strings")
    return values


@dataclass
class TokenizerSpec:
    name: str
    pat_str: str  # tiktoken split regex (the `regex`/fancy-regex dialect)
    ranks: dict[bytes, int]  # byte string -> rank; BPE merges the adjacent pair of lowest rank first
    special_tokens: dict[str, int]  # produced by chat templates, never by ordinary text
    n_vocab: int  # byte-level: ids >= n_vocab stand for bytes the vocabulary lacks; encoding drops them
    # byte-level BPE: None, and a rank is the token id. SentencePiece: ranks are priorities, these map them.
    sentencepiece: SentencePieceTables | None = None

    def save(self, folder: Path) -> None:
        lines = [base64.b64encode(tok) + b" " + str(rank).encode()
                 for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1])]
        (folder / TOKENIZER_RANKS_FILE).write_bytes(b"\n".join(lines) + b"\n")
        # version 2 only where version 1 readers would misread the file: they ignore "kind"
        spec = {"type": "tiktoken", "version": 2 if self.sentencepiece else 1, "name": self.name,
                "pat_str": self.pat_str, "n_vocab": self.n_vocab, "special_tokens": self.special_tokens,
                **(self.sentencepiece.to_json() if self.sentencepiece else {})}
        (folder / TOKENIZER_SPEC_FILE).write_text(json.dumps(spec, indent=1, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")

    def check(self, where: str, ranks_where: str | None = None) -> "TokenizerSpec":
        """What tiktoken needs to build an Encoding without a Rust panic (which is a BaseException)
        and to encode any text: unique ids, every single byte, ids the vocabulary can hold.
        ranks_where: where the ranks came from, if not from `where`."""
        def fail(problem, at=where):
            raise ModelFormatError(f"{at}: {problem}")

        def fail_ranks(problem):
            fail(problem, ranks_where or where)

        if not isinstance(self.n_vocab, int) or isinstance(self.n_vocab, bool) or not 1 <= self.n_vocab <= MAX_IDS:
            fail(f"n_vocab must be an integer in [1, {MAX_IDS}], got {self.n_vocab!r}")
        if not isinstance(self.pat_str, str) or not self.pat_str:
            fail("pat_str must be a non-empty string")
        ids = set(self.ranks.values())
        if not ids:
            fail_ranks("holds no tokens")
        if len(ids) != len(self.ranks):
            fail_ranks(f"{len(self.ranks) - len(ids)} token ids are shared by two tokens")
        lo, hi = min(ids), max(ids)  # (tiktoken itself refuses ids that are not integers)
        if self.sentencepiece is not None:
            if lo < 0 or hi >= len(self.ranks):  # with unique ranks: exactly 0 .. len - 1
                fail_ranks(f"ranks must be 0 .. {len(self.ranks) - 1}, got {lo}..{hi}")
            self._check_bytes(fail_ranks)
            self._check_special(fail, set())
            self.sentencepiece.check(self, fail)
            return self
        if lo < 0 or hi >= self.n_vocab + 256:
            fail_ranks(f"token ids must lie in [0, {self.n_vocab + 256}), got {lo}..{hi}")
        if hi >= self.n_vocab:  # ids from n_vocab on only stand for bytes the vocabulary lacks (make_spec)
            stand_ins = [t for t, r in self.ranks.items() if r >= self.n_vocab and len(t) != 1]
            if stand_ins:
                fail_ranks(f"token {stand_ins[0][:40]!r} has an id >= n_vocab {self.n_vocab}")
        self._check_bytes(fail_ranks)
        self._check_special(fail, ids)
        return self

    def _check_bytes(self, fail) -> None:
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            fail(f"the ranks lack the single byte {missing[0]:#04x} (every byte needs an id)")

    def _check_special(self, fail, ids: set[int]) -> None:
        """Special tokens: non-empty text, ids inside the vocabulary and not any other token's."""
        ids = set(ids)
        for text, tid in self.special_tokens.items():
            if not isinstance(text, str) or not text:
                fail(f"special token {text!r} must be a non-empty string")
            if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < self.n_vocab:
                fail(f"special token {text!r} has id {tid!r}, outside [0, {self.n_vocab})")
            if tid in ids:
                fail(f"special token {text!r} has id {tid}, which another token already has")
            ids.add(tid)

    @classmethod
    def load(cls, folder: Path) -> "TokenizerSpec":
        folder = Path(folder)
        spec_path, ranks_path = folder / TOKENIZER_SPEC_FILE, folder / TOKENIZER_RANKS_FILE
        f = Fields(read_json(spec_path), str(spec_path))
        if f.string("type", None, optional=True) != "tiktoken":
            raise ModelFormatError(f"{spec_path}: not an edgephi tokenizer spec (type must be \"tiktoken\")")
        version = f.integer("version", low=1)
        if version > SPEC_VERSION:
            raise ModelFormatError(f"{spec_path}: made by a newer edgephi (tokenizer version {version}, this "
                                   f"one reads {SPEC_VERSION}); upgrade edgephi or convert the model again")
        special = f.object("special_tokens")
        for text in special.data:
            special.integer(text, low=0)
        kind = f.string("kind", None, optional=True)
        if kind not in (None, SENTENCEPIECE):
            raise ModelFormatError(f"{spec_path}: unknown tokenizer kind {kind!r}")
        tables = SentencePieceTables.from_json(f) if kind == SENTENCEPIECE else None
        spec = cls(f.string("name"), f.string("pat_str"), read_ranks(ranks_path), dict(special.data),
                   f.integer("n_vocab", low=1, high=MAX_IDS), tables)
        return spec.check(str(spec_path), str(ranks_path))


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's file format: one `base64(token) rank` line per token, each token once."""
    ranks: dict[bytes, int] = {}
    lines = [line for line in read_bytes(path, MAX_RANKS_BYTES).splitlines() if line]
    try:
        for line in lines:  # the loop tiktoken's own loader runs: a 200k vocabulary in 0.2 s
            token, rank = line.split()
            ranks[binascii.a2b_base64(token)] = int(rank)
    except (ValueError, binascii.Error) as exc:  # also a line of one or three fields
        raise ModelFormatError(f"{path}: line {_bad_line(lines)} is not `base64-token rank` ({exc})") from None
    if len(ranks) != len(lines):
        raise ModelFormatError(f"{path}: line {_repeated_line(lines)} repeats a token")
    if not ranks:
        raise ModelFormatError(f"{path}: holds no tokens")
    if b"" in ranks:
        raise ModelFormatError(f"{path}: holds an empty token")
    return ranks


def _bad_line(lines: list[bytes]) -> int:
    """The number of the first line that is not `base64 integer` (the slow path of an error)."""
    for number, line in enumerate(lines, 1):
        try:
            token, rank = line.split()
            binascii.a2b_base64(token), int(rank)
        except (ValueError, binascii.Error):
            return number
    return 0


def _repeated_line(lines: list[bytes]) -> int:
    seen = set()
    for number, line in enumerate(lines, 1):
        token = binascii.a2b_base64(line.split()[0])
        if token in seen:
            return number
        seen.add(token)
    return 0
