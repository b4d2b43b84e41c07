"""Building blocks for hostile converter inputs: a GGUF writer that writes anything, tiny valid
models to corrupt, and a `convert` run under memory and time limits.

The GGUF writer is independent of the converter's reader and of the gguf package, so that it
can write what neither would: floats where sizes belong, dimensions whose product wraps 2^64,
unknown type ids, overlapping tensors.
"""

from __future__ import annotations

import math
import resource
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgephi.tokenizer_files import bytes_to_unicode

ADDRESS_SPACE = 4 << 30  # bytes: a reader that tries to allocate more fails instead of swapping
TIMEOUT = 60  # seconds per command; a refusal takes one or two

# GGUF value type ids
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_CODES = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
                U64: "Q", I64: "q", F64: "d"}
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 0, 1, 2, 3, 8  # ggml type ids
MAX_DATA = 1 << 24  # bytes of tensor data the writer lays out; beyond it, offsets are only declared


def limit_memory() -> None:
    """preexec_fn for a child process: cap its address space."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_convert_limited(args, cwd: Path | None = None):
    """`python -m edgephi.convert ARGS` under ADDRESS_SPACE and TIMEOUT -> test_convert_errors.Result."""
    from tests.test_convert_errors import Result

    proc = subprocess.run([sys.executable, "-m", "edgephi.convert", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, preexec_fn=limit_memory)
    return Result(proc.returncode, proc.stdout, proc.stderr)


# ---------------------------------------------------------------------------
# GGUF files from Python values


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGUF order: ne[0] (the row length) first
    ggml_type: int
    data: bytes = b""
    offset: int | None = None  # relative to the data section; None: after the previous tensor
    ndim: int | None = None  # None: len(dims)


@dataclass
class GGUF:
    """A GGUF file as values: metadata [(key, value type, value)] and tensors, in file order.

    A value is packed by its type: a Python number or str for scalars and strings,
    (element type, [values]) for arrays, or bytes, written as they are.
    """

    kv: list[tuple[str, int, object]]
    tensors: list[Tensor]
    version: int = 3
    alignment: int = 32
    counts: tuple[int, int] | None = None  # (tensors, keys) to declare; None: the true counts
    fields: list[tuple[int, int]] = field(default_factory=list)  # (offset, width) of integer fields
    offsets: dict[str, int] = field(default_factory=dict)  # tensor name -> data offset, as written

    def set(self, key: str, vtype: int, value) -> "GGUF":
        """Replace (or add) one metadata value."""
        self.kv = [kv for kv in self.kv if kv[0] != key] + [(key, vtype, value)]
        return self

    def drop(self, key: str) -> "GGUF":
        self.kv = [kv for kv in self.kv if kv[0] != key]
        return self

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name)

    def to_bytes(self) -> bytes:
        """The file; `fields` is refilled with where its integer fields (lengths, counts, types,
        dims, offsets) lie, for mutations that target them, and `offsets` with each tensor's."""
        self.fields = []
        out = bytearray(b"GGUF")
        n_tensors, n_kv = self.counts or (len(self.tensors), len(self.kv))
        self._int(out, "I", self.version)
        self._int(out, "Q", n_tensors)
        self._int(out, "Q", n_kv)
        for key, vtype, value in self.kv:
            self._string(out, key)
            self._int(out, "I", vtype)
            self._value(out, vtype, value)
        offsets, next_offset = [], 0
        for t in self.tensors:
            offset = next_offset if t.offset is None else t.offset
            offsets.append(offset)
            end = offset + len(t.data)
            if end <= MAX_DATA:  # a tensor placed far away (a hostile offset) moves no other
                next_offset = max(next_offset, end + (-end % self.alignment))
        self.offsets = {t.name: offset for t, offset in zip(self.tensors, offsets)}
        for t, offset in zip(self.tensors, offsets):
            self._string(out, t.name)
            self._int(out, "I", len(t.dims) if t.ndim is None else t.ndim)
            for d in t.dims:
                self._int(out, "Q", d)
            self._int(out, "I", t.ggml_type)
            self._int(out, "Q", offset)
        out += bytes(-len(out) % self.alignment)
        data_start = len(out)
        for t, offset in zip(self.tensors, offsets):
            if t.data and offset + len(t.data) <= MAX_DATA:  # data at a hostile offset is left out
                end = data_start + offset + len(t.data)
                out += bytes(max(0, end - len(out)))
                out[data_start + offset:end] = t.data
        out += bytes(-len(out) % self.alignment)
        return bytes(out)

    def _int(self, out: bytearray, code: str, value: int) -> None:
        self.fields.append((len(out), struct.calcsize(code)))
        out += struct.pack("<" + code, value)

    def _string(self, out: bytearray, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self._int(out, "Q", len(data))
        out += data

    def _value(self, out: bytearray, vtype: int, value) -> None:
        if isinstance(value, bytes):
            out += value
        elif vtype == STRING:
            self._string(out, value)
        elif vtype == ARRAY:
            etype, items = value
            self._int(out, "I", etype)
            self._int(out, "Q", len(items))
            for item in items:
                self._value(out, etype, item)
        else:
            out += struct.pack("<" + SCALAR_CODES[vtype], value)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes, in byte order."""
    return list(bytes_to_unicode().values())


def _blocks(ggml_type: int, rows: int, cols: int, rng: np.random.Generator) -> bytes:
    """Valid tensor data: finite values, and finite small scales for the quantized types."""
    if ggml_type in (GGML_F32, GGML_F16):
        dtype = "<f4" if ggml_type == GGML_F32 else "<f2"
        return rng.standard_normal((rows, cols)).astype(dtype).tobytes()
    n = rows * cols // 32
    scales = rng.uniform(0.01, 0.1, (n, 1)).astype("<f2").view(np.uint8)
    if ggml_type == GGML_Q8_0:
        quants = rng.integers(-127, 128, (n, 32), dtype=np.int8).view(np.uint8)
        return np.concatenate([scales, quants], axis=1).tobytes()
    nibbles = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    if ggml_type == GGML_Q4_1:
        mins = rng.uniform(-0.5, 0.0, (n, 1)).astype("<f2").view(np.uint8)
        return np.concatenate([scales, mins, nibbles], axis=1).tobytes()
    return np.concatenate([scales, nibbles], axis=1).tobytes()


# Merges over the byte-level alphabet; token 256 + i is merge i's result, so ids follow merge order.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]


def tiny_model(arch: str = "llama") -> GGUF:
    """A complete, valid one-layer model (width 64, 4 heads of 16, 2 kv heads for llama): every
    tensor the converter reads, in a mix of F32, F16, Q4_0, Q4_1 and Q8_0, and a byte-level BPE
    vocabulary of 256 bytes, 8 merges and one control token. phi3 adds LongRoPE factors."""
    rng = np.random.default_rng(0)
    D, F, H, Hk, Dh = 64, 64, 4, (2 if arch == "llama" else 4), 16
    tokens = byte_level_alphabet() + ["".join(m.split(" ")) for m in MERGES] + ["<|endoftext|>"]
    V = len(tokens)
    eot = V - 1
    kv = [("general.architecture", STRING, arch), ("general.name", STRING, f"tiny-{arch}"),
          (f"{arch}.context_length", U32, 128), (f"{arch}.embedding_length", U32, D),
          (f"{arch}.block_count", U32, 1), (f"{arch}.feed_forward_length", U32, F),
          (f"{arch}.attention.head_count", U32, H), (f"{arch}.attention.head_count_kv", U32, Hk),
          (f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-5), (f"{arch}.rope.freq_base", F32, 10000.0),
          ("tokenizer.ggml.model", STRING, "gpt2"), ("tokenizer.ggml.pre", STRING, "gpt-2"),
          ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
          ("tokenizer.ggml.token_type", ARRAY, (I32, [1] * (V - 1) + [3])),
          ("tokenizer.ggml.merges", ARRAY, (STRING, MERGES)),
          ("tokenizer.ggml.bos_token_id", U32, eot), ("tokenizer.ggml.eos_token_id", U32, eot),
          ("tokenizer.ggml.add_bos_token", BOOL, False),
          ("tokenizer.chat_template", STRING, "{% for m in messages %}{{ m['content'] }}{% endfor %}")]

    def matrix(name, rows, cols, ggml_type):
        return Tensor(name, [cols, rows], ggml_type, _blocks(ggml_type, rows, cols, rng))

    def vector(name, n, values=None):
        data = (rng.uniform(0.5, 1.5, n) if values is None else np.asarray(values)).astype("<f4").tobytes()
        return Tensor(name, [n], GGML_F32, data)

    tensors = []
    if arch == "phi3":
        kv += [("phi3.rope.dimension_count", U32, Dh), ("phi3.rope.scaling.original_context_length", U32, 32),
               ("phi3.rope.scaling.attn_factor", F32, math.sqrt(1 + math.log(4) / math.log(32)))]
        tensors += [vector("rope_factors_long.weight", Dh // 2, np.linspace(1.5, 6.0, Dh // 2)),
                    vector("rope_factors_short.weight", Dh // 2, np.linspace(1.0, 1.35, Dh // 2))]
    tensors += [matrix("token_embd.weight", V, D, GGML_Q8_0), vector("blk.0.attn_norm.weight", D)]
    if arch == "phi3":
        tensors += [matrix("blk.0.attn_qkv.weight", (H + 2 * Hk) * Dh, D, GGML_Q4_0)]
    else:
        tensors += [matrix("blk.0.attn_q.weight", H * Dh, D, GGML_Q4_0),
                    matrix("blk.0.attn_k.weight", Hk * Dh, D, GGML_Q4_1),
                    matrix("blk.0.attn_v.weight", Hk * Dh, D, GGML_F16)]
    tensors += [matrix("blk.0.attn_output.weight", D, H * Dh, GGML_Q8_0), vector("blk.0.ffn_norm.weight", D)]
    if arch == "phi3":
        tensors += [matrix("blk.0.ffn_up.weight", 2 * F, D, GGML_Q4_1)]
    else:
        tensors += [matrix("blk.0.ffn_gate.weight", F, D, GGML_Q4_0), matrix("blk.0.ffn_up.weight", F, D, GGML_Q4_1)]
    tensors += [matrix("blk.0.ffn_down.weight", D, F, GGML_F32), vector("output_norm.weight", D),
                matrix("output.weight", V, D, GGML_F16)]
    return GGUF(kv, tensors)
