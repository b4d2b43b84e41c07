"""Output folders built in a hidden folder beside OUT and renamed into place only when complete;
--force replaces only a folder edgephi wrote (or an empty one), never the user's other files."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import stat
from contextlib import contextmanager
from pathlib import Path

from edgephi.errors import EdgephiError, Terminated
from edgephi.format import CONFIG_FILE, FORMAT_NAME

MARKER = ".edgephi-partial"  # in every staging folder: marker_text(pid) of the process writing it
SMALL_FILE = 1 << 20  # bytes; a config.json or marker beyond this is not ours (never read a huge file)
TERMINATING = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


def marker_text(pid: int) -> str:
    # With the host: on a shared disk, another machine's pid says nothing about processes here.
    return f"{pid} {platform.node()}\n"


def _read_small(path: Path) -> bytes | None:
    """The bytes of a regular file under SMALL_FILE (not a FIFO, device or huge file), else None."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > SMALL_FILE:
            return None
        with open(path, "rb") as f:
            return f.read(SMALL_FILE)
    except OSError:
        return None


def is_model_folder(folder: Path) -> bool:
    """A folder whose config.json says it is in edgephi's model format."""
    try:
        config = json.loads(_read_small(folder / CONFIG_FILE) or b"")
    except (ValueError, RecursionError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT_NAME


def is_onnx_export(folder: Path) -> bool:
    """A folder written by export-onnx: its graph, and the source model's config in edgephi/."""
    from edgephi.onnx_backend import EDGEPHI_SUBFOLDER, is_onnx_folder

    return is_onnx_folder(folder) and is_model_folder(folder / EDGEPHI_SUBFOLDER)


REPLACEABLE = {"model": ("an edgephi model folder", is_model_folder),  # kind of OUT -> what --force
               "onnx": ("an ONNX export folder", is_onnx_export)}      # may replace (or an empty folder)


def check_target(out: Path, force: bool, src: Path | None = None, kind: str = "model") -> None:
    """Refuse, in one line, an OUT that cannot be created or that --force must not replace."""
    if not os.path.lexists(out):
        parent = next((p for p in out.parents if os.path.lexists(p)), None)
        if parent is not None and not parent.is_dir():
            raise EdgephiError(f"{out}: cannot create it, {parent} is not a folder")
    elif not force:
        raise EdgephiError(f"{out}: already exists (use --force to replace it)")
    elif reason := _why_not_replace(out, src, *REPLACEABLE[kind]):
        raise EdgephiError(f"{out}: --force refused: {reason}")


def _why_not_replace(out: Path, src: Path | None, what: str, replaceable) -> str:
    if os.path.islink(out):  # checked before resolving: deleting through a link hits its target
        return "it is a symbolic link"
    real, real_src = out.resolve(), None if src is None else Path(src).resolve()
    if real == real_src:
        return f"it is the source {src}"
    if real_src is not None and real in real_src.parents:
        return f"it contains the source {src}"
    if not out.is_dir():
        return f"it is a file, not {what}"
    if any(out.iterdir()) and not replaceable(out):
        return f"it is not {what} (--force replaces only {what} or an empty folder)"
    return ""


@contextmanager
def staged_folder(out: Path, check=None):
    """Yields an empty folder to fill, renamed to OUT at the end; any failure or signal removes it."""
    missing = [p for p in out.absolute().parents if not os.path.lexists(p)]  # deepest first
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    made = False
    with _handlers(_raise_terminated, TERMINATING):  # SIGTERM/SIGHUP then clean up as Ctrl-C does
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(out)
            tmp.mkdir()
            made = True
            (tmp / MARKER).write_text(marker_text(os.getpid()))
            yield tmp
            if check is not None:  # again: OUT may have changed during a long run
                check()
            _replace_folder(tmp, out)
        except BaseException:
            with _signals_held():  # a second Ctrl-C or SIGTERM must not stop the cleanup halfway
                _remove_made(tmp if made else None, missing)
            raise


def _remove_made(tmp: Path | None, missing: list[Path]) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    for folder in missing:
        try:
            os.rmdir(folder)  # only while empty: never what another process put there meanwhile
        except OSError:
            break


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing OUT (--force) is removed only after."""
    with _signals_held():  # a signal mid-swap would leave OUT missing or half deleted
        (tmp / MARKER).unlink()
        if not os.path.lexists(out):
            os.rename(tmp, out)
            return
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)


def _remove_stale(out: Path) -> None:
    """Remove the staging folders beside OUT that dead runs left, if they are provably ours."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    with os.scandir(out.parent) as entries:
        found = [(Path(e.path), m[1], int(m[2])) for e in entries
                 if (m := pattern.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)]
    for path, what, pid in found:
        # An old OUT renamed away was checked replaceable before, so it carries no marker.
        ours = _read_small(path / MARKER) == marker_text(pid).encode() or (
            what == "old" and (is_model_folder(path) or is_onnx_export(path)))
        if ours and not _live(pid):
            shutil.rmtree(path, ignore_errors=True)


def _live(pid: int) -> bool:
    """Whether another running process has this pid (signal 0 only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; or no valid pid: keep its folder
        return True
    return pid != os.getpid()  # a folder with our own pid is a dead namesake's


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextmanager
def _handlers(handler, signums):
    """Install handler for signums (main thread only), then restore the previous ones."""
    previous = {}
    try:
        for signum in signums:
            if signal.getsignal(signum) != signal.SIG_IGN:  # run under nohup: stay deaf to SIGHUP
                previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: only it may handle signals
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, signal.SIG_DFL if old is None else old)


@contextmanager
def _signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then take effect as usual."""
    held = []
    with _handlers(lambda signum, frame: held.append(signum), [signal.SIGINT, *TERMINATING]):
        yield
    if held:
        signal.raise_signal(held[0])
