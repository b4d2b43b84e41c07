"""Hostile model folders: every damaged or malicious file the runtime reads gives one line, never
a crash, hang or wrong answer (#12).

Each case copies a small converted model, damages one file, and runs `edgephi generate` (or
`chat`) on it in a child process under an address-space limit and a timeout. A refusal must be:
exit code 1, one `Error:` line on stderr naming the damaged file (and the field where there is
one), no traceback, no signal, the folder left as it was.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgephi.convert import convert

TIMEOUT_S = 60
ADDRESS_SPACE = 6 << 30  # numba and LLVM reserve about 2 GiB of address space before any work
CLI = "from edgephi.cli import main; main()"


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_cli(*args, stdin: str = "") -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CLI, *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT_S, preexec_fn=_limit_memory)
    return done, time.perf_counter() - started


@pytest.fixture(scope="module")
def base_model(checkpoint_factory, tmp_path_factory) -> Path:
    """A converted phi3 model with q4_0 linears, q8_0 embeddings and the tiny BPE tokenizer."""
    out = tmp_path_factory.mktemp("hostile") / "base"
    convert(checkpoint_factory("phi3_basic"), out, quant="q4_0", embed_quant="q8_0")
    return out


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------
# Damage, one file at a time


def edit_json(name: str, change):
    def damage(folder: Path) -> Path:
        path = folder / name
        data = json.loads(path.read_text())
        data = change(data) or data
        path.write_text(json.dumps(data))
        return path
    return damage


def set_field(name: str, key: str, value):
    return edit_json(name, lambda d: d.__setitem__(key, value))


def write_bytes(name: str, data: bytes | str):
    def damage(folder: Path) -> Path:
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
        return folder / name
    return damage


def special_file(name: str, kind: str):
    def damage(folder: Path) -> Path:
        path = folder / name
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")
        return path
    return damage


def remove(name: str):
    def damage(folder: Path) -> Path:
        (folder / name).unlink()
        return folder / name
    return damage


def edit_ranks(change):
    def damage(folder: Path) -> Path:
        path = folder / "tokenizer.tiktoken"
        lines = path.read_bytes().splitlines()
        path.write_bytes(b"\n".join(change(lines)) + b"\n")
        return path
    return damage


def _single_byte_line(lines, byte: int) -> int:
    return next(i for i, line in enumerate(lines) if base64.b64decode(line.split()[0]) == bytes([byte]))


def _drop_byte(lines):
    del lines[_single_byte_line(lines, ord("q"))]
    return lines


def _duplicate_rank(lines):
    token, _ = lines[300].split()
    lines[301] = lines[301].split()[0] + b" " + lines[300].split()[1]  # two tokens on one id
    return lines


def _duplicate_token(lines):
    lines[301] = lines[300].split()[0] + b" " + lines[301].split()[1]
    return lines


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 64)
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def edit_weights_header(change):
    def damage(folder: Path) -> Path:
        path = folder / "weights.safetensors"
        header, body = _header(path)
        change(header)
        _write_header(path, header, body)
        return path
    return damage


def _overlap(header):
    a, b = header["layers.0.qkv.d"], header["layers.0.o.d"]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]  # o's scales read qkv's


def _extra_tensor(header):
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header["layers.9.qkv.d"] = {"dtype": "F16", "shape": [0], "data_offsets": [end, end]}


def poke_tensor(name: str, value, dtype, at: int = 3):
    """Overwrite element `at` of tensor `name` in the weights file."""
    def damage(folder: Path) -> Path:
        path = folder / "weights.safetensors"
        header, _ = _header(path)
        n = int.from_bytes(path.read_bytes()[:8], "little")
        begin = 8 + n + header[name]["data_offsets"][0] + at * np.dtype(dtype).itemsize
        with open(path, "r+b") as f:
            f.seek(begin)
            f.write(np.array([value], dtype).tobytes())
        return path
    return damage


def fill_tensors(names: list[str], value, dtype):
    """Every element of tensors `names` set to `value`: finite, but enough to overflow float32."""
    def damage(folder: Path) -> Path:
        path = folder / "weights.safetensors"
        header, _ = _header(path)
        n = int.from_bytes(path.read_bytes()[:8], "little")
        with open(path, "r+b") as f:
            for name in names:
                begin, end = header[name]["data_offsets"]
                f.seek(8 + n + begin)
                f.write(np.full((end - begin) // np.dtype(dtype).itemsize, value, dtype).tobytes())
        return path
    return damage


def truncate(name: str, keep: float):
    def damage(folder: Path) -> Path:
        path = folder / name
        os.truncate(path, int(path.stat().st_size * keep))
        return path
    return damage


def template(source: str):
    return edit_json("generation.json", lambda d: d.__setitem__("chat_template", source))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CONFIG, GENERATION, SPEC, RANKS, WEIGHTS = ("config.json", "generation.json", "tokenizer.json", "tokenizer.tiktoken",
                                            "weights.safetensors")

# name -> (damage, words the message must hold besides the file, command)
CASES = {
    # config.json: types
    "config-is-a-list": (write_bytes(CONFIG, "[]"), ["JSON object"], "generate"),
    "config-string-size": (set_field(CONFIG, "hidden_size", "64"), ["hidden_size", "integer"], "generate"),
    "config-float-layers": (set_field(CONFIG, "num_layers", 2.0), ["num_layers", "integer"], "generate"),
    "config-bool-heads": (set_field(CONFIG, "num_heads", True), ["num_heads"], "generate"),
    "config-1e999-theta": (write_bytes(CONFIG, '{"format": "edgephi", "rope_theta": 1e999}'), ["1e999"], "generate"),
    "config-nan-literal": (write_bytes(CONFIG, '{"format": "edgephi", "rms_norm_eps": NaN}'), ["NaN"], "generate"),
    "config-deeply-nested": (write_bytes(CONFIG, _nested(100_000)), ["nested"], "generate"),
    "config-not-utf8": (write_bytes(CONFIG, b'{"format": "\xff"}'), ["UTF-8"], "generate"),
    "config-tie-string": (set_field(CONFIG, "tie_word_embeddings", "yes"), ["tie_word_embeddings"], "generate"),
    "config-eps-string": (set_field(CONFIG, "rms_norm_eps", "x"), ["rms_norm_eps"], "generate"),
    "config-tensors-list": (set_field(CONFIG, "tensors", []), ["tensors"], "generate"),
    "config-rope-scaling-string": (set_field(CONFIG, "rope_scaling", "longrope"), ["rope_scaling"], "generate"),
    "config-format-version-99": (set_field(CONFIG, "format_version", 99), ["newer edgephi"], "generate"),
    "config-format-version-string": (set_field(CONFIG, "format_version", "1"), ["format_version"], "generate"),
    # config.json: values the kernels would index with
    "rotary-dim-300": (set_field(CONFIG, "rotary_dim", 300), ["rotary_dim"], "generate"),
    "rotary-dim-4000": (set_field(CONFIG, "rotary_dim", 4000), ["rotary_dim"], "generate"),
    "rotary-dim-odd": (set_field(CONFIG, "rotary_dim", 15), ["rotary_dim"], "generate"),
    "num-layers-0": (set_field(CONFIG, "num_layers", 0), ["num_layers"], "generate"),
    "num-layers-fewer-than-the-file": (edit_json(CONFIG, lambda d: d.update(
        num_layers=1, tensors={k: v for k, v in d["tensors"].items() if not k.startswith("layers.1.")})),
        ["layers.1", "num_layers"], "generate"),
    "num-layers-more-than-the-file": (set_field(CONFIG, "num_layers", 3), ["3-layer"], "generate"),
    "negative-theta": (set_field(CONFIG, "rope_theta", -10000.0), ["rope_theta"], "generate"),
    "theta-beyond-float-range": (set_field(CONFIG, "rope_theta", 10 ** 400), ["rope_theta"], "generate"),
    "theta-beyond-float32": (set_field(CONFIG, "rope_theta", 1e300), ["rope_theta"], "generate"),
    "eps-huge": (set_field(CONFIG, "rms_norm_eps", 1e30), ["rms_norm_eps"], "generate"),
    "kv-heads-not-dividing": (set_field(CONFIG, "num_kv_heads", 3), ["num_kv_heads"], "generate"),
    "zero-heads": (set_field(CONFIG, "num_heads", 0), ["num_heads"], "generate"),
    "head-dim-changed": (set_field(CONFIG, "head_dim", 32), ["shape"], "generate"),
    "vocab-changed": (set_field(CONFIG, "vocab_size", 100), ["shape"], "generate"),
    "max-positions-0": (set_field(CONFIG, "max_position_embeddings", 0), ["max_position_embeddings"], "generate"),
    "sliding-window-0": (set_field(CONFIG, "sliding_window", 0), ["sliding_window"], "generate"),
    "unknown-architecture": (set_field(CONFIG, "architecture", "mamba"), ["architecture"], "generate"),
    "unknown-format": (edit_json(CONFIG, lambda d: d["tensors"]["layers.0.o"].update(format="q9_9")),
                       ["layers.0.o", "format"], "generate"),
    "recipe-shape-string": (edit_json(CONFIG, lambda d: d["tensors"]["layers.0.o"].update(shape="64x64")),
                            ["layers.0.o", "shape"], "generate"),
    "norm-quantized": (edit_json(CONFIG, lambda d: d["tensors"]["norm"].update(format="q8_0")), ["norm"],
                       "generate"),
    "longrope-factors-short": (set_field(CONFIG, "rope_scaling", {"short_factor": [1.0], "long_factor": [1.0],
                                                                  "attention_factor": 1.0}),
                               ["short_factor"], "generate"),
    "longrope-negative-factor": (set_field(CONFIG, "rope_scaling", {"short_factor": [-1.0] * 8,
                                                                    "long_factor": [1.0] * 8,
                                                                    "attention_factor": 1.0}),
                                 ["short_factor"], "generate"),
    "config-fifo": (special_file(CONFIG, "fifo"), ["not a regular file"], "generate"),
    "config-dev-zero": (special_file(CONFIG, "dev-zero"), ["not a regular file"], "generate"),
    # generation.json
    "generation-list": (write_bytes(GENERATION, "[1, 2]"), ["JSON object"], "generate"),
    "generation-bos-negative": (set_field(GENERATION, "bos_token_id", -5), ["bos_token_id"], "generate"),
    "generation-bos-string": (set_field(GENERATION, "bos_token_id", "<s>"), ["bos_token_id"], "generate"),
    "generation-eos-out-of-vocab": (set_field(GENERATION, "eos_token_ids", [10 ** 9]), ["eos_token_ids[0]"],
                                    "generate"),
    "generation-eos-not-a-list": (set_field(GENERATION, "eos_token_ids", "2"), ["eos_token_ids"], "generate"),
    "generation-add-bos-string": (set_field(GENERATION, "add_bos_token", "yes"), ["add_bos_token"], "generate"),
    "generation-template-number": (set_field(GENERATION, "chat_template", 5), ["chat_template"], "generate"),
    "generation-missing": (remove(GENERATION), ["missing"], "generate"),
    "generation-fifo": (special_file(GENERATION, "fifo"), ["not a regular file"], "generate"),
    # tokenizer.json (the spec)
    "spec-list": (write_bytes(SPEC, "[]"), ["JSON object"], "generate"),
    "spec-nested": (write_bytes(SPEC, '{"a": ' + _nested(50_000) + "}"), ["nested"], "generate"),
    "spec-n-vocab-string": (set_field(SPEC, "n_vocab", "x"), ["n_vocab"], "generate"),
    "spec-n-vocab-too-large": (set_field(SPEC, "n_vocab", 10_000), ["10000"], "generate"),
    "spec-special-negative": (edit_json(SPEC, lambda d: d["special_tokens"].update({"<|x|>": -5})),
                              ["<|x|>"], "generate"),
    "spec-special-on-a-rank-id": (edit_json(SPEC, lambda d: d["special_tokens"].update({"<|x|>": 300})),
                                  ["<|x|>", "300"], "generate"),
    "spec-bad-regex": (set_field(SPEC, "pat_str", "(("), ["tiktoken"], "generate"),
    "spec-other-type": (set_field(SPEC, "type", "sentencepiece"), ["tiktoken"], "generate"),
    "spec-version-99": (set_field(SPEC, "version", 99), ["newer edgephi"], "generate"),
    "spec-dev-zero": (special_file(SPEC, "dev-zero"), ["not a regular file"], "generate"),
    # tokenizer.tiktoken (the ranks)
    "ranks-two-tokens-one-id": (edit_ranks(_duplicate_rank), ["id"], "generate"),
    "ranks-repeated-token": (edit_ranks(_duplicate_token), ["line 302"], "generate"),
    "ranks-junk-line": (edit_ranks(lambda lines: lines[:10] + [b"!!!! x"] + lines[10:]), ["line 11"], "generate"),
    "ranks-missing-byte": (edit_ranks(_drop_byte), ["0x71"], "generate"),
    "ranks-huge-rank": (edit_ranks(lambda lines: lines[:-1] + [lines[-1].split()[0] + b" 1099511627776"]),
                        ["1099511627776"], "generate"),
    "ranks-empty": (write_bytes(RANKS, ""), ["no tokens"], "generate"),
    "ranks-fifo": (special_file(RANKS, "fifo"), ["not a regular file"], "generate"),
    "ranks-dev-zero": (special_file(RANKS, "dev-zero"), ["not a regular file"], "generate"),
    # weights.safetensors
    "weights-overlapping-tensors": (edit_weights_header(_overlap), ["overlap"], "generate"),
    "weights-extra-tensor": (edit_weights_header(_extra_tensor), ["layers.9.qkv.d"], "generate"),
    "weights-float-offset": (edit_weights_header(lambda h: h["norm"].update(
        data_offsets=[h["norm"]["data_offsets"][0] + 0.5, h["norm"]["data_offsets"][1]])), ["norm"], "generate"),
    "weights-nan-scale": (poke_tensor("layers.0.qkv.d", np.nan, np.float16), ["layers.0.qkv", "scale"],
                          "generate"),
    "weights-inf-norm": (poke_tensor("layers.1.ffn_norm", np.inf, np.float32), ["layers.1.ffn_norm"], "generate"),
    "weights-nan-embedding-scale": (poke_tensor("embed.d", np.nan, np.float16, at=1000), ["embed"], "generate"),
    "weights-overflowing-scales": (fill_tensors(["layers.0.gate_up.d", "layers.0.down.d"], 60000.0, np.float16),
                                   ["non-finite values"], "generate"),
    "weights-truncated": (truncate(WEIGHTS, 0.7), ["runs past the end"], "generate"),
    "weights-header-not-json": (write_bytes(WEIGHTS, struct.pack("<Q", 4) + b"{{{{"), ["header"], "generate"),
    "weights-fifo": (special_file(WEIGHTS, "fifo"), ["not a regular file"], "generate"),
    # chat templates
    "template-raise-exception": (template("{{ raise_exception('only user turns, please') }}"),
                                 ["only user turns, please"], "chat"),
    "template-syntax-error": (template("{% for m in messages %}"), ["chat_template"], "chat"),
    "template-huge-loop": (template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                    "{% endfor %}"), ["chat_template"], "chat"),
    "template-constant-power": (template("{{ 10 ** (10 ** 8) }}"), ["chat_template"], "chat"),
    "template-string-repeat": (template("{{ 'a' * 10 ** 9 }}"), ["chat_template"], "chat"),
    "template-runtime-type-error": (template("{{ messages[0]['content'] + 5 }}"), ["chat_template"], "chat"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES)
def test_hostile_model_folder_gives_one_line(case, base_model, tmp_path):
    damage, says, command = CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(base_model, folder)
    damaged = damage(folder)
    before = _snapshot(folder)
    if command == "chat":
        done, seconds = run_cli("chat", "-m", folder, "--max-tokens", "4", stdin="hello\n")
    else:
        done, seconds = run_cli("generate", "-m", folder, "--max-tokens", "4", "hello")
    output = f"exit {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    assert done.returncode == 1, output  # a signal would be negative; a wrong answer 0
    assert "Traceback" not in done.stdout + done.stderr, output
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    message = lines[0]
    assert damaged.name in message and str(folder) in message, message
    for word in says:
        assert word.lower() in message.lower(), f"{word!r} not in: {message}"
    assert seconds < 30, f"{seconds:.1f} s"
    assert _snapshot(folder) == before


def test_the_corpus_covers_every_file_of_a_model_folder():
    assert len(CASES) >= 60
    damaged = {name.split("-")[0] for name in CASES}
    assert {"config", "generation", "spec", "ranks", "weights", "template"} <= damaged
