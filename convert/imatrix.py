"""Calibration statistics in llama.cpp's importance-matrix file (the GGUF that `llama-imatrix` writes and
`llama-quantize --imatrix` reads): per GGUF weight name, `<name>.in_sum2` (float32, the sums of squared
inputs per column) and `<name>.counts` (float32, the tokens summed), with general.type = "imatrix".
Like llama-imatrix, output.weight is left out (its --process-output is off by default)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from edgephi.errors import EdgephiError
from edgephi.format import ModelConfig, source_parts

from .calibrate import ActivationStats
from .gguf_reader import GGUFFile

ALIGNMENT = 32  # GGUF's default


def gguf_entries(cfg: ModelConfig, stats: ActivationStats) -> dict[str, np.ndarray]:
    """GGUF weight name -> float32 sums of squared inputs (q, k and v share qkv's; gate and up share gate_up's)."""
    out = {}
    for name, sums in stats.sum_x2.items():
        if not name.startswith("layers."):
            continue
        for _, gguf_name, _ in source_parts(cfg, name):
            out[gguf_name] = sums.astype(np.float32)
    return out


def _gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def write_imatrix(path: str | Path, cfg: ModelConfig, stats: ActivationStats, dataset: str, chunks: int,
                  chunk_size: int) -> None:
    """The importance-matrix GGUF (v3), written beside `path` and renamed into place."""
    entries = [(f"{name}.{part}", values.reshape(-1).astype("<f4")) for name, sums in
               sorted(gguf_entries(cfg, stats).items())
               for part, values in (("in_sum2", sums), ("counts", np.array([stats.tokens], np.float32)))]
    kv = (_gguf_string("general.type") + struct.pack("<I", 8) + _gguf_string("imatrix")
          + _gguf_string("imatrix.datasets") + struct.pack("<IIQ", 9, 8, 1) + _gguf_string(dataset)
          + _gguf_string("imatrix.chunk_count") + struct.pack("<II", 4, chunks)
          + _gguf_string("imatrix.chunk_size") + struct.pack("<II", 4, chunk_size))
    infos, offset = b"", 0
    for name, values in entries:  # one dimension each (ne0 = length), type F32 (0)
        infos += _gguf_string(name) + struct.pack("<IQIQ", 1, len(values), 0, offset)
        offset += -(-values.nbytes // ALIGNMENT) * ALIGNMENT
    header = b"GGUF" + struct.pack("<IQQ", 3, len(entries), 4) + kv + infos
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header + bytes(-len(header) % ALIGNMENT))
        for _, values in entries:
            f.write(values.tobytes() + bytes(-values.nbytes % ALIGNMENT))
    tmp.replace(path)


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """GGUF weight name -> the importance llama-quantize hands its quantizer: in_sum2 / counts."""
    f = GGUFFile(path)
    arrays = {name: f.float_array(name).reshape(-1) for name in f.tensors if name.endswith((".in_sum2", ".counts"))}
    missing = [name for name in arrays if name.endswith(".in_sum2")
               and name.removesuffix(".in_sum2") + ".counts" not in arrays]
    if missing:
        raise EdgephiError(f"{path}: {missing[0]} has no .counts beside it")
    return {name.removesuffix(".in_sum2"): sums / arrays[name.removesuffix(".in_sum2") + ".counts"][0]
            for name, sums in arrays.items() if name.endswith(".in_sum2")}


def stats_from_imatrix(cfg: ModelConfig, path: str | Path) -> ActivationStats:
    """ActivationStats (as mean squares over one token) from an importance-matrix file, for the linears
    it covers: a stacked tensor takes the mean of its parts' entries (q, k and v see the same input)."""
    importance = read_imatrix(path)
    if not any(name.startswith("blk.") for name in importance):
        raise EdgephiError(f"{path}: no importance-matrix entries for transformer blocks")
    sums = {}
    for layer in range(cfg.num_layers):
        for kind in ("qkv", "o", "gate_up", "down"):
            name = f"layers.{layer}.{kind}"
            parts = [importance.get(gguf_name) for _, gguf_name, _ in source_parts(cfg, name)]
            parts = [p for p in parts if p is not None]
            if not parts:
                continue
            width = (cfg.intermediate_size if kind == "down" else cfg.num_heads * cfg.head_dim if kind == "o"
                     else cfg.hidden_size)
            if any(len(p) != width for p in parts):
                raise EdgephiError(f"{path}: the importance of {name} has {len(parts[0])} columns, the model {width}")
            sums[name] = np.mean(parts, axis=0).astype(np.float64)
    return ActivationStats(sums, 1)
