"""Just enough of R's serialization format (XDR, versions 2 and 3) to read the character vectors
of an R package's lazy-load data (data/Rdata.rdx + Rdata.rdb), such as janeaustenr's novels,
without R. Objects of other types raise ValueError."""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
NILVALUE_SXP, REFSXP = 254, 255
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
LATIN1 = 1 << 14  # a CHARSXP's encoding bit (in its "levels"); UTF-8 and ASCII ones decode as UTF-8


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not R's XDR serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # the writer's R version, the oldest reader's
        if version == 3:
            n = self.int()
            self.pos += n  # the native encoding's name
        elif version != 2:
            raise ValueError(f"R serialization version {version}")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # a long vector: two more words
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            return self.refs[(flags >> 8) - 1 if flags >> 8 else self.int() - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            text = self.data[self.pos:self.pos + n].decode("latin-1" if flags & LATIN1 else "utf-8")
            self.pos += n
            return text
        if kind == LISTSXP:  # a pairlist (attributes): {tag: value}
            out = {}
            while kind == LISTSXP:
                if flags & HAS_ATTR:
                    self.item()
                tag = self.item() if flags & HAS_TAG else None
                out[tag] = self.item()
                flags = self.int()
                kind = flags & 0xFF
            if kind != NILVALUE_SXP:
                raise ValueError(f"a pairlist ending in R type {kind}")
            return out
        if kind in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.length())]
        elif kind in (LGLSXP, INTSXP):
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == REALSXP:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind == NILSXP:
            return None
        else:
            raise ValueError(f"R type {kind} is not read here")
        if flags & HAS_ATTR:
            attributes = self.item()
            names = attributes.get("names")
            if names is not None and kind == VECSXP:
                return dict(zip(names, value))
        return value


def unserialize(data: bytes):
    """An R object: a character vector as a list of str (None for NA), a list with names as a dict."""
    return _Reader(data).item()


def _inflate(blob: bytes) -> bytes:
    """One object of a lazy-load database: a 4-byte length, then zlib data, or with R >= 2.10's
    type byte ('Z' zlib, '2' bzip2, 'X' xz, '0' none)."""
    size = struct.unpack_from(">I", blob)[0]
    kind, body = blob[4:5], blob[5:]
    if kind == b"2":
        out = bz2.decompress(body)
    elif kind == b"X":
        out = lzma.decompress(body)
    elif kind == b"0":
        out = body
    elif kind == b"Z":
        out = zlib.decompress(body)
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != size:
        raise ValueError("a lazy-load object's length disagrees with its header")
    return out


def lazy_load_data(folder: Path) -> dict:
    """{name: object} of an R package's data folder (Rdata.rdx, Rdata.rdb)."""
    index_bytes = (folder / "Rdata.rdx").read_bytes()
    index = unserialize(gzip.decompress(index_bytes) if index_bytes[:2] == b"\x1f\x8b" else _inflate(index_bytes))
    database = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = unserialize(_inflate(database[offset:offset + length]))
    return out
