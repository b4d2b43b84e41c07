"""`edgephi convert SRC OUT` on bad input, run as a real subprocess.

Every refusal must be: exit code 1, one `Error: <message>` line on stderr naming the offending
file, no traceback anywhere, and nothing written (OUT absent, no `.OUT.partial-<pid>` or
`.OUT.old-<pid>` left in OUT's parent). Plus the successful paths that share the machinery:
a GGUF import, an HF checkpoint quantized to q8_0, and --force replacing an existing OUT.

The last section holds the regression tests of converter bugs that were fixed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration  # every case runs the converter's CLI in a subprocess

TIMEOUT = 180  # seconds per command; a normal run takes one or two

# ---------------------------------------------------------------------------
# Running the command three ways: `python -m edgephi.convert`, edgephi.cli.main, the console script


def _console_script() -> str | None:
    # The script beside this interpreter first: a pyenv shim on PATH may pick another Python.
    beside = Path(sys.executable).parent / "edgephi"
    return str(beside) if beside.is_file() else shutil.which("edgephi")


LAUNCHERS = ["module", "main", "script"]


def _command(launcher: str, args: list[str], prelude: str = "") -> list[str]:
    if launcher == "script" and not prelude and (script := _console_script()):
        return [script, "convert", *args]
    if launcher == "module" and not prelude:
        return [sys.executable, "-m", "edgephi.convert", *args]
    return [sys.executable, "-c", prelude + "\nfrom edgephi.cli import main; main()", "convert", *args]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def __str__(self):
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


def run_convert(args, launcher: str = "module", prelude: str = "", env: dict | None = None,
                cwd: Path | None = None) -> Result:
    proc = subprocess.run(_command(launcher, [str(a) for a in args], prelude), capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env={**os.environ, **(env or {})})
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(request, tmp_path):
    """cli(*args, **kw) -> Result, with the launcher picked from the test id (stable across runs),
    so that every launcher serves about a third of the cases."""
    launcher = LAUNCHERS[zlib.crc32(request.node.nodeid.encode()) % len(LAUNCHERS)]

    def run(*args, **kw):
        kw.setdefault("launcher", launcher)
        kw.setdefault("cwd", tmp_path)
        return run_convert(list(args), **kw)

    return run


@pytest.fixture
def dest(tmp_path) -> Path:
    """An empty folder to hold OUT (= dest / "model")."""
    d = tmp_path / "dest"
    d.mkdir()
    return d


def error_line(res: Result, src, out) -> str:
    """The `Error:` line of a refused command, after the checks every refusal shares."""
    assert "Traceback" not in res.stdout + res.stderr, res
    assert res.returncode == 1, res
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res
    return lines[0]


def assert_refused(res: Result, src, out: Path, names, says=(), before: list[str] | None = None) -> str:
    """Checks a refusal: one error line naming `names` (paths) and saying `says`; nothing written.

    before: OUT's parent listing before the run (default: empty); it must be unchanged.
    """
    msg = error_line(res, src, out)
    print(msg)  # shown with the captured output of a failing test, or with -s
    for name in [names] if isinstance(names, (str, Path)) else names:
        assert str(name) in msg, f"{name} not named in: {msg}"
    for word in [says] if isinstance(says, str) else says:
        assert word.lower() in msg.lower(), f"{word!r} not in: {msg}"
    if before is None:
        assert not out.exists(), f"{out} was written"
        before = []
    if out.parent.exists():
        assert sorted(os.listdir(out.parent)) == sorted(before), "leftovers beside OUT"
    return msg


# ---------------------------------------------------------------------------
# Inputs: copies of the session fixtures, corrupted


def _link_big(src: str, dst: str) -> None:
    # Large files (shards, tokenizer.json) become symlinks to the shared originals: they are
    # read only, and every change goes through own(), which replaces the link first.
    if os.path.getsize(src) > 1 << 20:
        os.symlink(os.path.realpath(src), dst)
    else:
        shutil.copy2(src, dst)


def clone(src: Path, dst: Path) -> Path:
    """Copy the checkpoint folder `src` to `dst`; change files only through own()/replace_file()."""
    shutil.copytree(src, dst, copy_function=_link_big, dirs_exist_ok=True)
    return dst


def own(path: Path) -> Path:
    """Make `path` a real file of its own (not a link to a shared fixture) before changing it."""
    if path.is_symlink():
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
    return path


def replace_file(path: Path, data: bytes | str) -> None:
    """Write a new file at `path` (never through a link)."""
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    replace_file(path, json.dumps(data, ensure_ascii=False))


def shard_of(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    replace_file(path, len(text).to_bytes(8, "little") + text + data[8 + n:])


def _stats(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def phi3(checkpoint_factory):
    """The shared fixture folder, as built: read only (checked when the module is done, since
    other test files use the same folder)."""
    folder = checkpoint_factory("phi3_basic", tokenizer=True)
    before = _stats(folder)
    yield folder
    assert _stats(folder) == before, "the shared phi3_basic fixture folder was modified"


@pytest.fixture
def ckpt(phi3, tmp_path) -> Path:
    """A private copy of the checkpoint, to corrupt."""
    return clone(phi3, tmp_path / "ckpt")


# GPT-2's printable stand-ins for the 256 bytes, in byte order: a complete byte-level vocabulary.
def _byte_level_tokens() -> list[str]:
    from edgephi.tokenizer_files import BYTE_DECODER

    by_byte = {b: c for c, b in BYTE_DECODER.items()}
    return [by_byte[b] for b in range(256)]


def write_tiny_gguf(path: Path, arch: str = "llama", *, tokenizer_model: str = "gpt2",
                    skip: tuple[str, ...] = (), embed_type: str = "f32") -> Path:
    """A one-tensor GGUF (token_embd only) with llama-style metadata, vocabulary 256, width 256.

    Enough for the converter to read its config and tokenizer; it fails at the first tensor
    it needs beyond the embedding, so use it for cases that fail earlier or at the embedding.
    """
    import gguf

    V, D = 256, 256
    w = gguf.GGUFWriter(str(path), arch)
    for key, add, value in [("context_length", w.add_context_length, 128),
                            ("embedding_length", w.add_embedding_length, D),
                            ("block_count", w.add_block_count, 1),
                            ("feed_forward_length", w.add_feed_forward_length, 512),
                            ("head_count", w.add_head_count, 4),
                            ("head_count_kv", w.add_head_count_kv, 4)]:
        if key not in skip:
            add(value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(_byte_level_tokens())
    w.add_token_types([1] * V)
    if embed_type == "iq4_nl":  # 32-element blocks of 18 bytes, a type edgephi does not compute with
        w.add_tensor("token_embd.weight", np.zeros((V, D // 32 * 18), np.uint8),
                     raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    else:
        w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((V, D), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def raw_gguf(kv: list[tuple[str, int, bytes]], version: int = 3) -> bytes:
    """A GGUF with no tensors, from (key, value type id, packed value) triples."""
    out = b"GGUF" + struct.pack("<IQQ", version, 0, len(kv))
    for key, vtype, value in kv:
        k = key.encode()
        out += struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + value
    return out


def _prefix(path: Path, nbytes: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(nbytes)


# ---------------------------------------------------------------------------
# SRC missing or not a model


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_src_does_not_exist(launcher, tmp_path, dest):
    src, out = tmp_path / "no-such-model", dest / "model"
    res = run_convert([src, out], launcher=launcher, cwd=tmp_path)
    assert_refused(res, src, out, src, "no such file")


def test_src_missing_does_not_create_out_parents(cli, tmp_path):
    src, out = tmp_path / "no-such-model", tmp_path / "new" / "deeper" / "model"
    assert_refused(cli(src, out), src, out, src)
    assert not (tmp_path / "new").exists()


def test_folder_without_config(cli, tmp_path, dest):
    src, out = tmp_path / "photos", dest / "model"
    src.mkdir()
    (src / "holiday.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a model")
    assert_refused(cli(src, out), src, out, src / "config.json", "missing")


@pytest.mark.parametrize("kind", ["text", "empty", "safetensors-shard"])
def test_file_that_is_neither_gguf_nor_folder(kind, cli, phi3, tmp_path, dest):
    if kind == "safetensors-shard":  # a user pointing at a weights file rather than its folder
        src = shards(phi3)[-1]
    else:
        src = tmp_path / "model.bin"
        src.write_text("hello, I am not a model\n" if kind == "text" else "")
    out = dest / "model"
    assert_refused(cli(src, out), src, out, src, "not a GGUF file")


# ---------------------------------------------------------------------------
# config.json

CONFIG_CASES = {
    "not-json": ("{'hidden_size': 64,", "not valid JSON"),
    "json-list": ("[1, 2, 3]", "expected a JSON object"),
    "gpt2-architecture": (lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                          "unsupported architecture"),
    "no-architectures": (lambda c: (c.pop("architectures"), c.update(model_type="mistral")),
                         "unsupported architecture"),
    "missing-hidden_size": (lambda c: c.pop("hidden_size"), "missing hidden_size"),
    "non-numeric-hidden_size": (lambda c: c.update(hidden_size="wide"), "bad value"),
    "dynamic-rope-scaling": (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                 "rope_theta": 10000.0}),
                             "rope scaling 'dynamic' is not supported"),
    "heads-do-not-divide": (lambda c: c.update(num_key_value_heads=3), "multiple of num_kv_heads"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config(case, cli, ckpt, dest):
    change, says = CONFIG_CASES[case]
    path = ckpt / "config.json"
    if callable(change):
        edit_json(path, change)
    else:
        replace_file(path, change)
    out = dest / "model"
    assert_refused(cli(ckpt, out), ckpt, out, path, says)


# ---------------------------------------------------------------------------
# Shards and safetensors files


def _missing_shard(ckpt):
    shard = shards(ckpt)[1]
    shard.unlink()
    return shard, ["missing", "model.safetensors.index.json"]


def _truncated(which):
    def corrupt(ckpt):
        shard = shards(ckpt)[which]
        replace_file(shard, shard.read_bytes()[:-1000])
        return shard, "truncated"
    return corrupt


def _garbage_header_length(ckpt):
    shard = own(shards(ckpt)[0])
    with open(shard, "r+b") as f:
        f.write(b"\xff" * 8)
    return shard, "corrupt safetensors header"


def _header_not_json(ckpt):
    shard = own(shards(ckpt)[-1])
    n = header_length(shard)
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"!" * n)
    return shard, "corrupt safetensors header"


def _int32_tensor(ckpt):
    from safetensors.numpy import load_file, save_file

    name = "model.layers.0.self_attn.o_proj.weight"
    shard = shard_of(ckpt, name)
    tensors = load_file(str(shard))
    tensors[name] = (tensors[name] * 100).astype(np.int32)  # same size: the index stays true
    shard.unlink()  # never write through the link to the shared fixture
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard, ["unsupported dtype I32", name]


def _fp8_tensor(ckpt):
    name = "model.layers.1.mlp.down_proj.weight"
    shard = shard_of(ckpt, name)

    def to_fp8(header):  # 4 bytes per element become 4 elements of one byte
        header[name]["dtype"] = "F8_E4M3"
        header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] * 4]

    rewrite_header(shard, to_fp8)
    return shard, ["unsupported dtype F8_E4M3", name]


def _index_lists_absent_tensor(ckpt):
    shard = shards(ckpt)[0]
    edit_json(ckpt / "model.safetensors.index.json",
              lambda ix: ix["weight_map"].update({"model.layers.0.mlp.extra.weight": shard.name}))
    return shard, "model.layers.0.mlp.extra.weight"


def _hidden_size_mismatch(ckpt):
    edit_json(ckpt / "config.json", lambda c: c.update(hidden_size=96))
    return shard_of(ckpt, "model.embed_tokens.weight"), ["has shape [100352, 64]", "expected [100352, 96]"]


def _intermediate_size_mismatch(ckpt):
    edit_json(ckpt / "config.json", lambda c: c.update(intermediate_size=160))
    return (shard_of(ckpt, "model.layers.0.mlp.gate_up_proj.weight"),
            ["model.layers.0.mlp.gate_up_proj.weight", "expected [320, 64]"])


def _unexpected_tensor(ckpt):
    from safetensors.numpy import save_file

    extra = ckpt / "model-extra.safetensors"
    save_file({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}, str(extra))
    edit_json(ckpt / "model.safetensors.index.json",
              lambda ix: ix["weight_map"].update({"model.layers.0.self_attn.q_norm.weight": extra.name}))
    return ckpt, ["unexpected tensors", "q_norm"]


WEIGHT_CASES = {
    "shard-missing": _missing_shard,
    "first-shard-truncated": _truncated(0),
    "last-shard-truncated": _truncated(-1),
    "header-length-garbage": _garbage_header_length,
    "header-not-json": _header_not_json,
    "index-lists-absent-tensor": _index_lists_absent_tensor,
    "int32-tensor": _int32_tensor,
    "fp8-tensor": _fp8_tensor,
    "hidden_size-mismatch": _hidden_size_mismatch,
    "intermediate_size-mismatch": _intermediate_size_mismatch,
    "unexpected-tensor": _unexpected_tensor,
}


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_bad_weights(case, cli, ckpt, dest):
    offender, says = WEIGHT_CASES[case](ckpt)
    out = dest / "model"
    assert_refused(cli(ckpt, out), ckpt, out, offender, says)


# ---------------------------------------------------------------------------
# tokenizer.json

TOKENIZER_CASES = {
    "missing": (None, "missing"),
    "not-json": ('{"model": {"type": "BPE", ', "cannot read tokenizer"),
    "sentencepiece-byte-fallback": (lambda t: t["model"].update(byte_fallback=True),
                                    ["SentencePiece", "not supported"]),
    "wordpiece": (lambda t: t["model"].update(type="WordPiece"), "not BPE"),
    "normalizer": (lambda t: t.update(normalizer={"type": "NFC"}), "normalizer NFC is not supported"),
}


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_bad_tokenizer(case, cli, ckpt, dest):
    change, says = TOKENIZER_CASES[case]
    path = ckpt / "tokenizer.json"
    if change is None:
        path.unlink()
    elif callable(change):
        edit_json(path, change)
    else:
        replace_file(path, change)
    out = dest / "model"
    assert_refused(cli(ckpt, out), ckpt, out, path, says)


# ---------------------------------------------------------------------------
# GGUF files


def _bad_magic(tmp_path, gguf_path):
    # The magic is checked before anything else, so a 1 MB prefix is as good as the whole file.
    return b"GGUX" + _prefix(gguf_path, 1 << 20)[4:], "not a GGUF file"


def _truncated_in_header(tmp_path, gguf_path):
    return _prefix(gguf_path, 1 << 20), "truncated or corrupt GGUF header"  # the header is 1.8 MB


def _truncated_in_data(tmp_path, gguf_path):
    return _prefix(gguf_path, 2 << 20), "runs past the end of the file"


def _unsupported_version(tmp_path, gguf_path):
    data = bytearray(write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes())
    data[4:8] = struct.pack("<I", 7)
    return bytes(data), "unsupported GGUF version 7"


def _arch(arch):
    def make(tmp_path, gguf_path):
        return write_tiny_gguf(tmp_path / "tiny.gguf", arch).read_bytes(), f"unsupported GGUF architecture '{arch}'"
    return make


def _metadata_missing(tmp_path, gguf_path):
    data = write_tiny_gguf(tmp_path / "tiny.gguf", skip=("embedding_length",)).read_bytes()
    return data, "llama.embedding_length is missing"


def _sentencepiece_vocab(tmp_path, gguf_path):
    return (write_tiny_gguf(tmp_path / "tiny.gguf", tokenizer_model="llama").read_bytes(),
            ["SentencePiece", "not supported"])


def _iq_tensor(tmp_path, gguf_path):  # i-quants stay refused, by name, with the types that work
    return (write_tiny_gguf(tmp_path / "tiny.gguf", embed_type="iq4_nl").read_bytes(),
            ["token_embd.weight", "IQ4_NL", "Q4_K"])


def _unknown_value_type(tmp_path, gguf_path):
    return raw_gguf([("general.architecture", 99, b"")]), "unknown value type 99"


GGUF_CASES = {
    "bad-magic": _bad_magic,
    "truncated-in-header": _truncated_in_header,
    "truncated-in-tensor-data": _truncated_in_data,
    "unsupported-version": _unsupported_version,
    "gpt2-architecture": _arch("gpt2"),
    "qwen2-architecture": _arch("qwen2"),
    "metadata-missing": _metadata_missing,
    "sentencepiece-vocabulary": _sentencepiece_vocab,
    "iq4_nl-tensor": _iq_tensor,
    "unknown-value-type": _unknown_value_type,
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_bad_gguf(case, cli, smollm2_gguf, tmp_path, dest):
    data, says = GGUF_CASES[case](tmp_path, smollm2_gguf)
    src, out = tmp_path / "model.gguf", dest / "model"
    src.write_bytes(data)
    assert_refused(cli(src, out), src, out, src, says)


# ---------------------------------------------------------------------------
# OUT exists, --force


def _existing_out(dest: Path, kind: str) -> Path:
    """OUT as a folder of the user's files, a file, or (kind "model") a folder edgephi wrote."""
    out = dest / "model"
    if kind == "file":
        out.write_text("keep me")
        return out
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    if kind == "model":  # what the format check reads; a stray file shows whether it was replaced
        (out / "config.json").write_text(json.dumps({"format": "edgephi", "format_version": 1}))
    return out


def _untouched(out: Path, kind: str) -> bool:
    if kind == "file":
        return out.is_file() and out.read_text() == "keep me"
    expected = ["config.json", "precious.txt"] if kind == "model" else ["precious.txt"]
    return sorted(os.listdir(out)) == expected and (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_out_exists_without_force(kind, cli, phi3, dest):
    out = _existing_out(dest, kind)
    assert_refused(cli(phi3, out), phi3, out, out, ["already exists", "--force"], before=["model"])
    assert _untouched(out, kind)


def test_force_with_bad_source_keeps_out(cli, ckpt, dest):
    out = _existing_out(dest, "model")
    (ckpt / "config.json").unlink()
    assert_refused(cli(ckpt, out, "--force"), ckpt, out, ckpt / "config.json", before=["model"])
    assert _untouched(out, "model")


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_force_refuses_out_that_edgephi_did_not_write(kind, cli, phi3, dest):
    out = _existing_out(dest, kind)
    assert_refused(cli(phi3, out, "--force"), phi3, out, out, ["--force refused", "edgephi model folder"],
                   before=["model"])
    assert _untouched(out, kind)


def test_force_replaces_out(cli, phi3, dest):
    out = _existing_out(dest, "model")
    res = cli(phi3, out, "--force")
    assert res.returncode == 0, res
    assert "Traceback" not in res.stdout + res.stderr
    assert out.is_dir()
    files = set(os.listdir(out))
    assert {"config.json", "weights.safetensors", "tokenizer.json", "tokenizer.tiktoken",
            "generation.json"} <= files, files
    assert "precious.txt" not in files
    assert os.listdir(dest) == ["model"], "leftovers beside OUT"
    assert json.loads((out / "config.json").read_text())["tensors"]["layers.0.qkv"]["format"] == "q4_0"


# ---------------------------------------------------------------------------
# A failure in the middle of writing

# Runs inside the command: after the first block of weights has been written, the source shard
# holding layer 0 shrinks to its header, as if another program were rewriting it, so the next
# read fails while the partial folder is half written. The hook records what it saw.
SHRINK_PRELUDE = """
import json, os
import edgephi.convert.pipeline as _pipeline
_victim, _size, _log = os.environ["T_VICTIM"], int(os.environ["T_SIZE"]), os.environ["T_LOG"]
_write = _pipeline.SafetensorsWriter.write
def _write_then_shrink(self, *args, **kwargs):
    _write(self, *args, **kwargs)
    if os.path.getsize(_victim) > _size:
        with open(_log, "w") as f:
            json.dump({"partial": str(self.path.parent), "files": os.listdir(self.path.parent)}, f)
        os.truncate(_victim, _size)
_pipeline.SafetensorsWriter.write = _write_then_shrink
"""


def _shrink_mid_write(ckpt: Path, out: Path, tmp_path: Path):
    victim = own(shard_of(ckpt, "model.layers.0.self_attn.qkv_proj.weight"))
    assert victim != shard_of(ckpt, "model.embed_tokens.weight")  # the embedding is written first
    log = tmp_path / "hook.json"
    env = {"T_VICTIM": str(victim), "T_SIZE": str(8 + header_length(victim)), "T_LOG": str(log)}
    res = run_convert([ckpt, out, "--quant", "q8_0"], launcher="main", prelude=SHRINK_PRELUDE, env=env,
                      cwd=tmp_path)
    assert log.exists(), f"the hook never ran\n{res}"
    seen = json.loads(log.read_text())
    assert Path(seen["partial"]).parent == out.parent
    assert re.fullmatch(rf"\.{out.name}\.partial-\d+", Path(seen["partial"]).name), seen
    assert "weights.safetensors" in seen["files"]
    return res, victim


def test_failure_mid_write_leaves_nothing(ckpt, tmp_path, dest):
    out = dest / "model"
    res, victim = _shrink_mid_write(ckpt, out, tmp_path)
    assert_refused(res, ckpt, out, victim, "shrank")


# ---------------------------------------------------------------------------
# Successful conversions


def test_gguf_import(smollm2_gguf, dest):
    out = dest / "model"
    res = run_convert([smollm2_gguf, out], launcher="module")
    assert res.returncode == 0, res
    assert "Traceback" not in res.stdout + res.stderr
    assert re.search(r"134\.\dM parameters", res.stdout), res
    rows = dict(re.findall(r"^\s+(\w+)\s+\S+\s+(.+)$", res.stdout, re.M))
    for kind in ("embed", "qkv", "o", "gate_up", "down"):
        assert rows[kind] == "0 (copied bit for bit)", res.stdout
    assert rows["norm"] == "0 (exact)", res.stdout
    assert {"config.json", "weights.safetensors"} <= set(os.listdir(out))
    assert os.listdir(dest) == ["model"]


def _check_q8_0_report(res: Result, out: Path, dest: Path) -> None:
    assert res.returncode == 0, res
    assert "Traceback" not in res.stdout + res.stderr
    assert re.search(r"12\.9M parameters", res.stdout), res
    rows = {kind: (fmt, err) for kind, fmt, err in re.findall(r"^\s+(\w+)\s+(\S+)\s+(.+)$", res.stdout, re.M)}
    for kind in ("embed", "qkv", "o", "gate_up", "down", "output"):
        fmt, err = rows[kind]
        assert fmt == "q8_0", res.stdout
        assert re.fullmatch(r"\d\.\d\de-\d\d", err), res.stdout
        assert 0 < float(err) < 1e-2, res.stdout  # int8 with a scale per 32: about 0.3 %
    for kind in ("attn_norm", "ffn_norm", "norm"):
        assert rows[kind] == ("f32", "0 (exact)"), res.stdout
    assert {"config.json", "weights.safetensors"} <= set(os.listdir(out))
    assert os.listdir(dest) == ["model"]


def test_hf_checkpoint_q8_0(phi3, dest):
    out = dest / "model"
    _check_q8_0_report(run_convert([phi3, out, "--quant", "q8_0"], launcher="module"), out, dest)


# ---------------------------------------------------------------------------
# Regressions: converter and CLI bugs that were fixed.


def test_stderr_is_exactly_one_line(tmp_path, dest):
    """The CLI printed `converting SRC -> OUT` on stderr before it looked at SRC, which made a
    refusal two lines, not one."""
    src, out = tmp_path / "no-such-model", dest / "model"
    res = run_convert([src, out], launcher="module", cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.splitlines() == [f"Error: {src}: no such file or folder"], res


# Malformed values that used to escape as tracebacks instead of one Error line.
CRASHING_CONFIGS = {
    "zero-attention-heads": lambda c: c.update(num_attention_heads=0),  # ZeroDivisionError
    "architectures-not-a-list": lambda c: c.update(architectures=5),  # TypeError
}


@pytest.mark.parametrize("case", CRASHING_CONFIGS)
def test_malformed_config_values(case, cli, ckpt, dest):
    edit_json(ckpt / "config.json", CRASHING_CONFIGS[case])
    out = dest / "model"
    assert_refused(cli(ckpt, out), ckpt, out, ckpt / "config.json")


CRASHING_TOKENIZERS = {
    "json-list": "[]",  # AttributeError: 'list' object has no attribute 'get'
    "bpe-without-vocab": json.dumps({"model": {"type": "BPE"},
                                     "pre_tokenizer": {"type": "ByteLevel"}}),  # KeyError: 'vocab'
}


@pytest.mark.parametrize("case", CRASHING_TOKENIZERS)
def test_malformed_tokenizer_json(case, cli, ckpt, dest):
    path = ckpt / "tokenizer.json"
    replace_file(path, CRASHING_TOKENIZERS[case])
    out = dest / "model"
    assert_refused(cli(ckpt, out), ckpt, out, path)


def test_gguf_alignment_zero(cli, tmp_path, dest):
    """general.alignment = 0 (once a ZeroDivisionError in GGUFFile._parse)."""
    src, out = tmp_path / "model.gguf", dest / "model"
    src.write_bytes(raw_gguf([("general.alignment", 4, struct.pack("<I", 0))]))
    assert_refused(cli(src, out), src, out, src)


def test_failure_mid_write_removes_the_folders_it_created(ckpt, tmp_path):
    """OUT's missing parents are created before writing, and removed again after a failure
    (they used to stay behind)."""
    out = tmp_path / "new" / "deeper" / "model"
    res, victim = _shrink_mid_write(ckpt, out, tmp_path)
    error_line(res, ckpt, out)
    assert not (tmp_path / "new").exists(), "empty parent folders left behind"
