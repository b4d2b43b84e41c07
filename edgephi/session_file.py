"""Chat sessions saved to disk and resumed: the KV ring's used slots, the token history, the
messages, and which model computed them.

A session file is a safetensors file (read with edgephi's own checked reader) whose metadata holds
the format name and version, the model's identity (sha256 of its config and weights), the KV
element type and the ring's counters, and whose tensors are the used slots' K, V (and int8 scales),
their positions and tokens, and the ids the session fed. It is written to a temporary file beside
the target and renamed over it, so a failed save leaves the old file whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgephiError
from .files import brief, parse_json
from .format import CONFIG_FILE, WEIGHTS_FILE
from .kv_cache import KVCache
from .messages import check_messages
from .safetensors_io import SafetensorsFile
from .user_cache import cache_root

SESSION_FORMAT = "edgephi-session"
SESSION_VERSION = 2  # 2: an int8 KV's scales are float16 per 16 values (version 1: float32 per 32)
RING_FIELDS = ("capacity", "sinks", "keep", "next_pos", "lost_below", "exact_end")  # KVCache counters saved
KV_ARRAYS = ("k", "v", "k_scale", "v_scale")


class SessionFileError(EdgephiError):
    """A session file that cannot be resumed: truncated, foreign, from another model or version."""


def model_identity(folder: Path) -> str:
    """sha256 of the model's config and weights files. Hashing the weights takes about 1 s a GB
    here and far longer on a board without SHA instructions, so the result is remembered in the
    user cache, keyed by each file's path, size, inode and change times."""
    stamps = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        st = os.stat(folder / name)
        stamps.append(f"{(folder / name).resolve()}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}")
    memo = cache_root() / "model-identity" / hashlib.sha256("\0".join(stamps).encode()).hexdigest()
    try:
        known = memo.read_text()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(folder / name, "rb") as f:
            file_digest = hashlib.file_digest(f, "sha256").digest()
        digest.update(name.encode() + b"\0" + file_digest)
    identity = digest.hexdigest()
    try:  # a read-only or full cache only costs the next run the hashing again
        memo.parent.mkdir(parents=True, exist_ok=True)
        temporary = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        temporary.write_text(identity)
        os.replace(temporary, memo)
    except OSError:
        pass
    return identity


@dataclass
class SavedSession:
    """What a session file holds, checked against the model resuming it."""

    messages: list[dict]
    system: str | None
    fed: list[int]  # every id the session put in its cache, in order
    ring: dict[str, int]  # RING_FIELDS
    long_rope: bool
    slots: np.ndarray  # int64 (n,): used slots, in position order
    positions: np.ndarray  # int64 (n,)
    tokens: np.ndarray  # int64 (n,)
    kv: dict[str, np.ndarray]  # KV_ARRAYS: (L, n, ...) rows of those slots

    def restore_into(self, cache: KVCache) -> None:
        """Write the saved slots and counters into a fresh cache of the saved capacity and sinks."""
        cache.restore(self.slots, self.positions, self.tokens, self.kv, next_pos=self.ring["next_pos"],
                      keep=self.ring["keep"], lost_below=self.ring["lost_below"], exact_end=self.ring["exact_end"],
                      long_rope=self.long_rope)


def save_session(path: str | Path, *, identity: str, kernels: str, kv_dtype: str, cache: KVCache,
                 messages: list[dict], system: str | None, fed: list[int]) -> None:
    """Write a session file atomically: a temporary file in the same folder, renamed over `path`.
    kernels: what computed the KV (edgephi's version and the ISA), see read_session."""
    from safetensors.numpy import save_file  # the writer only; reading goes through our checked reader

    path = Path(path)
    tokens, positions, slots = cache.cached_tokens()
    tensors = {"fed": np.asarray(fed, np.int64), "slots": slots, "positions": positions, "tokens": tokens}
    for name in KV_ARRAYS if kv_dtype == "int8" else KV_ARRAYS[:2]:
        tensors[name] = np.ascontiguousarray(getattr(cache, name)[:, slots])
    state = {name: int(getattr(cache, name)) for name in RING_FIELDS}
    state.update(long_rope=bool(cache.long_rope), messages=messages, system=system)
    metadata = {"format": SESSION_FORMAT, "version": str(SESSION_VERSION), "model": identity,
                "kernels": kernels, "kv_dtype": kv_dtype, "state": json.dumps(state)}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise EdgephiError(f"{path}: cannot save the session ({exc.strerror or exc})") from None
    finally:
        temporary.unlink(missing_ok=True)


def read_session(path: str | Path, *, identity: str, kernels: str, kv_dtype: str, layers: int, kv_width: int,
                 kv_blocks: int, vocab_size: int) -> SavedSession:
    """A session file, checked: its format and version, that this model (identity) and KV type
    wrote it, and that every array fits a cache of the saved capacity. Raises SessionFileError.
    KV that other kernels computed (another edgephi version or ISA, which may round differently)
    continues the conversation but is not marked exact, so no other sequence shares it."""
    path = Path(path)

    def refuse(problem: str):
        raise SessionFileError(f"{path}: {problem}")

    try:
        file = SafetensorsFile(path)
    except EdgephiError as exc:
        refuse(f"not a readable session file ({str(exc).removeprefix(f'{path}: ')})")
    meta = file.metadata
    if meta.get("format") != SESSION_FORMAT:
        refuse("not an edgephi session file")
    version = meta.get("version")
    if version == "1" and meta.get("kv_dtype") == "int8":
        refuse("session file version 1 holds an int8 KV cache in the old blocks of 32, which this edgephi "
               "no longer reads; start a new session")
    if version not in ("1", str(SESSION_VERSION)):  # version 1's float caches are as version 2's
        refuse(f"session file version {brief(version)}; this edgephi reads versions 1 and {SESSION_VERSION}")
    if meta.get("model") != identity:
        refuse("saved with another model (its config or weights differ from this one's); "
               "resume it with the model that saved it, or start a new session")
    if meta.get("kv_dtype") != kv_dtype:
        refuse(f"saved with a {brief(meta.get('kv_dtype'))} KV cache; load the model with "
               f"kv_dtype={brief(meta.get('kv_dtype'))} (--kv-dtype) to resume it")
    try:
        state = parse_json(meta.get("state", ""), "state", dict)
    except EdgephiError as exc:
        refuse(f"corrupt session state ({exc})")
    ring = {name: state.get(name) for name in RING_FIELDS}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ring.values()):
        refuse("corrupt session state (ring counters)")
    if not isinstance(state.get("long_rope"), bool) or not (state.get("system") is None or isinstance(state["system"], str)):
        refuse("corrupt session state")
    try:
        messages = check_messages(state.get("messages"), allow_empty=True)
    except ValueError as exc:
        refuse(f"corrupt session messages ({exc})")

    names = ("fed", "slots", "positions", "tokens") + (KV_ARRAYS if kv_dtype == "int8" else KV_ARRAYS[:2])
    if sorted(file.keys()) != sorted(names):
        refuse("corrupt session file (unexpected arrays)")
    arrays = {name: np.array(file.raw(name)) for name in names}  # copied: the file may be replaced later
    for name in ("fed", "slots", "positions", "tokens"):
        if arrays[name].dtype != np.int64 or arrays[name].ndim != 1:
            refuse(f"corrupt session file ({name})")
    slots, positions, tokens, fed = arrays["slots"], arrays["positions"], arrays["tokens"], arrays["fed"]
    n, capacity = len(slots), ring["capacity"]
    element = {"float16": np.uint16, "float32": np.float32, "int8": np.int8}[kv_dtype]
    shapes = {"k": ((layers, n, kv_width), element), "v": ((layers, n, kv_width), element),
              "k_scale": ((layers, n, kv_blocks), np.uint16), "v_scale": ((layers, n, kv_blocks), np.uint16)}
    kv = {}
    for name in KV_ARRAYS:
        shape, dtype = shapes[name]
        kv[name] = arrays.get(name, np.zeros(shape, dtype))
        if kv[name].shape != shape or kv[name].dtype != dtype:
            refuse(f"corrupt session file ({name} is not {shape} {np.dtype(dtype).name})")
    keep = ring["keep"]
    if not (2 <= capacity and min(ring["sinks"], capacity - 1) <= keep < capacity and n <= capacity
            and len(positions) == len(tokens) == n and ring["exact_end"] <= ring["next_pos"]):
        refuse("corrupt session state (ring sizes)")
    ring_slots = np.where(positions < keep, positions, keep + (positions - keep) % (capacity - keep))
    if n and (positions.min() < 0 or positions.max() >= ring["next_pos"] or np.any(np.diff(positions) <= 0)
              or len(np.unique(slots)) != n or not np.array_equal(slots, ring_slots)):
        refuse("corrupt session state (slots)")
    for ids in (tokens, fed):
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            refuse(f"token ids outside this model's vocabulary of {vocab_size}")
    if meta.get("kernels") != kernels:
        ring["exact_end"] = 0
    return SavedSession(messages, state["system"], fed.tolist(), ring, state["long_rope"], slots, positions,
                        tokens, kv)
