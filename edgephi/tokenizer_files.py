"""The tokenizer as stored in a model folder: tiktoken ranks plus a small JSON spec.

Shared by the converter (which writes it) and the runtime (which builds a tiktoken Encoding from it).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFormatError
from .files import Fields, read_bytes, read_json
from .format import TOKENIZER_RANKS_FILE, TOKENIZER_SPEC_FILE

SPEC_VERSION = 1
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
class TokenizerSpec:
    name: str
    pat_str: str  # tiktoken split regex (the `regex`/fancy-regex dialect)
    ranks: dict[bytes, int]  # byte string -> id; BPE merges the adjacent pair of lowest id first
    special_tokens: dict[str, int]  # produced by chat templates, never by ordinary text
    n_vocab: int  # ids >= n_vocab stand for bytes the vocabulary lacks; encoding drops them

    def save(self, folder: Path) -> None:
        lines = [base64.b64encode(tok) + b" " + str(rank).encode()
                 for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1])]
        (folder / TOKENIZER_RANKS_FILE).write_bytes(b"\n".join(lines) + b"\n")
        spec = {"type": "tiktoken", "version": SPEC_VERSION, "name": self.name, "pat_str": self.pat_str,
                "n_vocab": self.n_vocab, "special_tokens": self.special_tokens}
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
        if lo < 0 or hi >= self.n_vocab + 256:
            fail_ranks(f"token ids must lie in [0, {self.n_vocab + 256}), got {lo}..{hi}")
        if hi >= self.n_vocab:  # ids from n_vocab on only stand for bytes the vocabulary lacks (make_spec)
            stand_ins = [t for t, r in self.ranks.items() if r >= self.n_vocab and len(t) != 1]
            if stand_ins:
                fail_ranks(f"token {stand_ins[0][:40]!r} has an id >= n_vocab {self.n_vocab}")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            fail_ranks(f"the ranks lack the single byte {missing[0]:#04x} (every byte needs an id)")
        for text, tid in self.special_tokens.items():
            if not isinstance(text, str) or not text:
                fail(f"special token {text!r} must be a non-empty string")
            if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < self.n_vocab:
                fail(f"special token {text!r} has id {tid!r}, outside [0, {self.n_vocab})")
            if tid in ids:
                fail(f"special token {text!r} has id {tid}, which another token already has")
            ids.add(tid)
        return self

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
        spec = cls(f.string("name"), f.string("pat_str"), read_ranks(ranks_path), dict(special.data),
                   f.integer("n_vocab", low=1, high=MAX_IDS))
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
