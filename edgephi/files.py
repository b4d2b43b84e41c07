"""Reading model files defensively: regular files only, bounded sizes, JSON of the expected types.

Every failure becomes an EdgephiError naming the file (and the field), so a damaged or hostile
file gives one line: never a traceback, a hang on a FIFO, or an endless read of /dev/zero.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from .errors import ModelFormatError

MAX_NUMBER = 1e300  # beyond this a JSON number is no model setting; also keeps float(value) finite
MAX_JSON_BYTES = 256 << 20  # o200k's tokenizer.json is about 27 MB; nothing we read is near this


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of `path`, which must be a regular file. O_NONBLOCK makes opening a
    FIFO return at once instead of waiting for a writer; it is refused right after."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing") from None
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot open ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelFormatError(f"{path}: not a regular file")
    return fd


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The whole file, which must be a regular file of at most `limit` bytes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ModelFormatError(f"{path}: too large ({size} bytes; at most {limit} expected)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while we read it
        raise ModelFormatError(f"{path}: too large (more than {limit} bytes)")
    return data


def read_text(path: str | Path, limit: int = MAX_JSON_BYTES) -> str:
    try:
        return read_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def is_finite_number(value) -> bool:
    """An int or float (not a bool) of finite value; a JSON integer may be far beyond float range,
    where math.isfinite raises OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def parse_json(text: str | bytes, where: str, expect: type = dict):
    """JSON with finite numbers only (no NaN, Infinity or 1e999), of type `expect` at the top."""
    try:
        data = json.loads(text, parse_constant=_no_constants, parse_float=_finite_float)
    except RecursionError:
        raise ModelFormatError(f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, expect):
        raise ModelFormatError(f"{where}: expected a JSON {_json_name(expect)}, got {_json_name(type(data))}")
    return data


def read_json(path: str | Path, expect: type = dict, limit: int = MAX_JSON_BYTES):
    return parse_json(read_text(path, limit), str(path), expect)


def _json_name(kind) -> str:
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "true/false",
             type(None): "null"}
    if isinstance(kind, tuple):
        return " or ".join(_json_name(k) for k in kind)
    return names.get(kind, kind.__name__)


class Fields:
    """Typed reads of one JSON object's fields; errors name the file and the field."""

    MISSING = object()

    def __init__(self, data: dict, where: str, prefix: str = ""):
        if not isinstance(data, dict):
            raise ModelFormatError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a JSON object, "
                                   f"got {_json_name(type(data))}")
        self.data, self.where, self.prefix = data, where, prefix

    def fail(self, key: str, problem: str):
        raise ModelFormatError(f"{self.where}: {self.prefix}{key} {problem}")

    def _get(self, key: str, default):
        if key in self.data:
            return self.data[key]
        if default is Fields.MISSING:
            self.fail(key, "is missing")
        return default

    def integer(self, key: str, default=MISSING, *, low: int | None = None, high: int | None = None,
                optional: bool = False) -> int | None:
        """An integer (not a bool, not 3.0) in [low, high]; None allowed when optional."""
        value = self._get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"must be an integer, got {value!r}"[:200])
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"in [{low}, {high}]" if low is not None else f"<= {high}"
            self.fail(key, f"must be {bounds}, got {value}")
        return value

    def number(self, key: str, default=MISSING, *, positive: bool = False, nonnegative: bool = False) -> float:
        value = self._get(key, default)
        if not is_finite_number(value) or abs(value) > MAX_NUMBER:
            self.fail(key, f"must be a finite number, got {brief(value)}")
        if positive and value <= 0 or nonnegative and value < 0:
            self.fail(key, f"must be {'> 0' if positive else '>= 0'}, got {value}")
        return float(value)

    def string(self, key: str, default=MISSING, *, optional: bool = False) -> str | None:
        value = self._get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_json_name(type(value))}")
        return value

    def boolean(self, key: str, default=MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}"[:200])
        return value

    def array(self, key: str, default=MISSING) -> list:
        value = self._get(key, default)
        if not isinstance(value, list):
            self.fail(key, f"must be a JSON array, got {_json_name(type(value))}")
        return value

    def object(self, key: str, default=MISSING, *, optional: bool = False) -> "Fields | None":
        value = self._get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            self.fail(key, f"must be a JSON object, got {_json_name(type(value))}")
        return Fields(value, self.where, f"{self.prefix}{key}.")

    def numbers(self, key: str, *, positive: bool = False) -> tuple[float, ...]:
        """An array of finite numbers."""
        values = self.array(key)
        for i, v in enumerate(values):
            if not is_finite_number(v) or abs(v) > MAX_NUMBER or (positive and v <= 0):
                self.fail(f"{key}[{i}]", f"must be a finite{' positive' if positive else ''} number, got {v!r}"[:200])
        return tuple(float(v) for v in values)


def brief(value, width: int = 60) -> str:
    """repr(value) cut to `width` characters: a hostile file may hold a megabyte where a name belongs."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."
