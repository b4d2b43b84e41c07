"""Output folders built in a temporary folder beside OUT and renamed into place only when complete."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from edgephi.errors import EdgephiError


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise EdgephiError(f"{out}: already exists (use --force to replace it)")


@contextmanager
def staged_folder(out: Path):
    """Yields an empty folder to fill; on success it becomes OUT (replacing an old OUT only then).
    On any failure the folder, and any parent folders made for OUT, are removed: nothing is left."""
    created = next((p for p in reversed(out.absolute().parents) if not p.exists()), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing OUT (--force) is removed only after."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, out)
