"""`--force` replaces only what edgephi wrote, and runs that end early (SIGTERM, SIGHUP, Ctrl-C,
SIGKILL) leave nothing behind, at once or after the next run. Real subprocesses of the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgephi.convert.staging import MARKER, marker_text
from tests.test_convert_errors import (  # noqa: F401  (ckpt, cli, dest, phi3: fixtures used here)
    TIMEOUT, _command, assert_refused, ckpt, cli, clone, dest, error_line, phi3, run_convert, write_tiny_gguf)

pytestmark = pytest.mark.integration  # the converter's CLI in subprocesses

MODEL_FILES = {"config.json", "weights.safetensors", "tokenizer.json", "tokenizer.tiktoken", "generation.json"}


def snapshot(root: Path) -> dict:
    """Every path under root with its kind, size and mtime (links not followed): to compare before/after."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            seen[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return seen


def fake_model(folder: Path) -> Path:
    """A folder that passes as an edgephi model folder: what --force checks is config.json's format."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format": "edgephi", "format_version": 1}))
    (folder / "weights.safetensors").write_bytes(b"old weights")
    return folder


def assert_converted(res, out: Path, quant: str = "q4_0") -> None:
    assert res.returncode == 0, res
    assert "Traceback" not in res.stdout + res.stderr
    files = set(os.listdir(out))
    assert MODEL_FILES <= files and MARKER not in files, files
    assert json.loads((out / "config.json").read_text())["tensors"]["layers.0.qkv"]["format"] == quant
    assert os.listdir(out.parent) == [out.name], "leftovers beside OUT"


# ---------------------------------------------------------------------------
# What --force refuses: one line naming OUT and why; OUT and SRC untouched


def _config_fifo(out: Path) -> None:
    os.mkfifo(out / "config.json")  # reading it would block forever: the check must not open it


USER_FOLDERS = {
    "no-config": lambda out: None,
    "other-format": lambda out: (out / "config.json").write_text(json.dumps({"format": "mine"})),
    "config-not-json": lambda out: (out / "config.json").write_text('{"format": "edgephi",'),
    "config-fifo": _config_fifo,
    "config-over-1MiB": lambda out: (out / "config.json").write_text(
        json.dumps({"format": "edgephi", "padding": "x" * (1 << 20)})),
}


@pytest.mark.parametrize("case", USER_FOLDERS)
def test_force_keeps_a_folder_of_user_files(case, cli, phi3, dest):
    out = dest / "model"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    (out / "notes.txt").write_text("keep me")
    USER_FOLDERS[case](out)
    before = snapshot(out)
    assert_refused(cli(phi3, out, "--force"), phi3, out, out, ["--force refused", "not an edgephi model folder"],
                   before=["model"])
    assert snapshot(out) == before


def test_force_refuses_the_source_itself(cli, ckpt, tmp_path):
    listing, before = sorted(os.listdir(tmp_path)), snapshot(ckpt)
    assert_refused(cli(ckpt, ckpt, "--force"), ckpt, ckpt, ckpt, "is the source", before=listing)
    assert snapshot(ckpt) == before


def test_force_refuses_a_model_folder_that_contains_the_source(cli, phi3, tmp_path):
    out = fake_model(tmp_path / "outer")  # replaceable on its own: only SRC inside it stops --force
    src = clone(phi3, out / "checkpoint")
    before = snapshot(out)
    assert_refused(cli(src, out, "--force"), src, out, [out, src], "contains the source", before=["outer"])
    assert snapshot(out) == before


def test_force_refuses_a_symlink_to_a_model_folder(cli, phi3, dest, tmp_path):
    target = fake_model(tmp_path / "real-model")
    out = dest / "model"
    out.symlink_to(target)
    before = snapshot(target)
    assert_refused(cli(phi3, out, "--force"), phi3, out, out, "symbolic link", before=["model"])
    assert out.is_symlink() and os.readlink(out) == str(target)
    assert snapshot(target) == before


def test_force_refuses_a_gguf_file(cli, phi3, dest):
    out = write_tiny_gguf(dest / "model.gguf")
    data = out.read_bytes()
    assert_refused(cli(phi3, out, "--force"), phi3, out, out, "is a file", before=["model.gguf"])
    assert out.read_bytes() == data


@pytest.mark.parametrize("below", ["model", "sub/model"])
def test_out_below_a_file_names_the_file(below, cli, phi3, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    out = notes / below
    msg = error_line(cli(phi3, out), phi3, out)
    assert msg == f"Error: {out}: cannot create it, {notes} is not a folder"
    assert notes.read_text() == "keep me"


# ---------------------------------------------------------------------------
# What --force replaces


def test_force_replaces_an_empty_folder(cli, phi3, dest):
    out = dest / "model"
    out.mkdir()
    assert_converted(cli(phi3, out, "--force"), out)


def test_force_replaces_a_previous_conversion(cli, phi3, dest):
    out = dest / "model"
    assert_converted(cli(phi3, out), out)
    assert_converted(cli(phi3, out, "--force", "--quant", "q8_0"), out, quant="q8_0")


# ---------------------------------------------------------------------------
# Staging folders of runs that died


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(ProcessLookupError):  # reaped: its pid names no process now
        os.kill(proc.pid, 0)
    return proc.pid


def staging(dest: Path, name: str, marker: str | None = None) -> None:
    """A staging folder beside OUT with a file in it and, if given, the marker text."""
    (dest / name).mkdir()
    (dest / name / "weights.safetensors").write_bytes(b"half written")
    if marker is not None:
        (dest / name / MARKER).write_text(marker)


def test_next_run_removes_only_dead_runs_marked_folders(cli, phi3, dest):
    dead, unmarked, elsewhere, live = dead_pid(), dead_pid(), dead_pid(), os.getpid()  # this test lives on
    staging(dest, f".model.partial-{dead}", marker_text(dead))
    fake_model(dest / f".model.old-{dead}")  # an old OUT renamed away, in edgephi's format
    kept = {
        f".model.partial-{live}": marker_text(live),  # a running conversion's
        f".model.partial-{unmarked}": None,  # not provably ours
        f".model.old-{unmarked}": None,  # neither marked nor a model
        f".model.partial-{elsewhere}": f"{elsewhere} another-machine\n",  # that pid is another host's
        f".other.partial-{dead}": marker_text(dead),  # beside another OUT: not this run's business
    }
    for name, marker in kept.items():
        staging(dest, name, marker)
    res = cli(phi3, dest / "model")
    assert res.returncode == 0, res
    assert sorted(os.listdir(dest)) == sorted(["model", *kept])


# Runs inside the command: after the first block of weights is written, say where the partial
# folder is (T_READY, written whole by a rename) and sleep until a signal arrives. T_SIGHUP
# "ignore" starts the command as nohup would; "default" as a terminal does, whatever pytest inherited.
PAUSE_PRELUDE = """
import os, signal, time
import edgephi.convert.pipeline as _pipeline
signal.signal(signal.SIGHUP, signal.SIG_IGN if os.environ["T_SIGHUP"] == "ignore" else signal.SIG_DFL)
_write, _ready = _pipeline.SafetensorsWriter.write, os.environ["T_READY"]
def _write_then_pause(self, *args, **kwargs):
    _write(self, *args, **kwargs)
    if not os.path.exists(_ready):
        with open(_ready + ".tmp", "w") as f:
            f.write(str(self.path.parent))
        os.rename(_ready + ".tmp", _ready)
        time.sleep(300)
_pipeline.SafetensorsWriter.write = _write_then_pause
"""


def start_paused(src: Path, out: Path, tmp_path: Path, sighup: str = "default"):
    """A conversion paused mid-write: (its process, its partial folder)."""
    ready = tmp_path / "ready"
    env = {**os.environ, "T_READY": str(ready), "T_SIGHUP": sighup}
    proc = subprocess.Popen(_command("main", [str(src), str(out)], PAUSE_PRELUDE), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    deadline = time.monotonic() + TIMEOUT
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"the conversion never paused: exit {proc.returncode}\n{stdout}{stderr}")
        time.sleep(0.05)
    return proc, Path(ready.read_text())


def test_killed_runs_partial_folder_is_removed_by_the_next_run(phi3, dest, tmp_path):
    out = dest / "model"
    proc, partial = start_paused(phi3, out, tmp_path)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate(timeout=TIMEOUT)
    assert partial.parent == dest and (partial / MARKER).read_text() == marker_text(proc.pid)
    assert_converted(run_convert([phi3, out], launcher="module", cwd=tmp_path), out)


# ---------------------------------------------------------------------------
# Signals while converting: cleaned up like Ctrl-C, one line, exit code 128 + the signal

SIGNAL_ENDINGS = {  # signal -> (exit code, the line on stderr)
    "SIGTERM": (128 + signal.SIGTERM, "terminated by SIGTERM"),
    "SIGHUP": (128 + signal.SIGHUP, "terminated by SIGHUP"),
    "SIGINT": (130, "interrupted"),  # Ctrl-C, as it was
}


def stderr_lines(stderr: str, src: Path, out: Path) -> list[str]:
    # Without blank lines (Ctrl-C's message starts a fresh line) and a `converting` banner.
    return [line for line in stderr.splitlines() if line and line != f"converting {src} -> {out}"]


@pytest.mark.parametrize("name", SIGNAL_ENDINGS)
def test_signal_mid_conversion_leaves_nothing(name, phi3, tmp_path):
    out = tmp_path / "new" / "deeper" / "model"
    proc, partial = start_paused(phi3, out, tmp_path)
    assert partial.is_dir()
    proc.send_signal(getattr(signal, name))
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert "Traceback" not in stdout + stderr, stderr
    assert (proc.returncode, stderr_lines(stderr, phi3, out)) == (SIGNAL_ENDINGS[name][0], [SIGNAL_ENDINGS[name][1]])
    assert not (tmp_path / "new").exists(), "OUT, its partial folder or its parents left behind"


def test_sighup_ignored_under_nohup(phi3, tmp_path):
    out = tmp_path / "new" / "model"
    proc, partial = start_paused(phi3, out, tmp_path, sighup="ignore")
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)  # time enough to have ended, were SIGHUP handled
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert (proc.returncode, stderr_lines(stderr, phi3, out)) == (128 + signal.SIGTERM, ["terminated by SIGTERM"])
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------
# export-onnx --force: replaces a previous export, not the user's files nor a converted model


def export_cli(model: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edgephi.cli import main; main()", "export-onnx",
                           str(model), str(out), "--no-check", *flags], capture_output=True, text=True,
                          timeout=TIMEOUT)


def assert_export_refused(done, out: Path, says: str) -> None:
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == [f"Error: {out}: --force refused: {says}"], done.stderr


def test_export_onnx_force(phi3, tmp_path):
    from edgephi.convert.pipeline import convert

    model = tmp_path / "model"
    convert(phi3, model, quant="q4_0")
    onnx = tmp_path / "onnx"
    assert export_cli(model, onnx).returncode == 0
    (onnx / "stale.txt").write_text("from the previous export")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    other_model = fake_model(tmp_path / "other-model")
    listing = sorted(os.listdir(tmp_path))

    assert_export_refused(export_cli(model, mine, "--force"), mine,
                          "it is not an ONNX export folder (--force replaces only an ONNX export folder "
                          "or an empty folder)")
    assert_export_refused(export_cli(model, other_model, "--force"), other_model,
                          "it is not an ONNX export folder (--force replaces only an ONNX export folder "
                          "or an empty folder)")
    assert os.listdir(mine) == ["notes.txt"] and (other_model / "weights.safetensors").read_bytes() == b"old weights"
    done = export_cli(model, onnx, "--force")
    assert done.returncode == 0, done.stderr
    assert "stale.txt" not in os.listdir(onnx) and (onnx / "model.onnx").is_file()
    assert sorted(os.listdir(tmp_path)) == listing, "leftovers beside OUT"
