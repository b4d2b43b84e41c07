"""Session fixtures over tests/fixtures.py: each artifact is built once per run.

Each run is hermetic: before any test module (or edgephi) is imported, HOME, the XDG folders and
EDGEPHI_CACHE point into a fresh temporary folder, removed at the end, so no test reads or writes
the user's ~/.cache/edgephi (its converted models above all); subprocesses inherit the same.
Three things stay shared, as they only save time and are checked where they are used:
- EDGEPHI_KERNEL_CACHE: compiled kernels, in subfolders keyed by a hash of the kernel sources;
- EDGEPHI_TEST_FIXTURES: tests/fixtures.py's pinned downloads, each checked against its sha256;
- pip's cache and configuration (PIP_CACHE_DIR, PIP_CONFIG_FILE), for the `pip download`s.
Each is taken from the environment as the run found it, else from where it lies for that user.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


def _pip_user_state() -> dict[str, str]:
    """PIP_CACHE_DIR and PIP_CONFIG_FILE as pip finds them under the original HOME (unless set)."""
    out = {}
    try:
        from pip._internal.configuration import get_configuration_files, kinds
        from pip._internal.locations import USER_CACHE_DIR
    except ImportError:  # pip's layout changed: its usual Linux folders
        base = Path.home()
        config = Path(os.environ.get("XDG_CONFIG_HOME") or base / ".config")
        USER_CACHE_DIR = str(Path(os.environ.get("XDG_CACHE_HOME") or base / ".cache") / "pip")
        user_files = [str(base / ".pip" / "pip.conf"), str(config / "pip" / "pip.conf")]
    else:
        user_files = get_configuration_files()[kinds.USER]
    if not os.environ.get("PIP_CACHE_DIR"):
        out["PIP_CACHE_DIR"] = USER_CACHE_DIR
    if not os.environ.get("PIP_CONFIG_FILE"):
        # pip reads PIP_CONFIG_FILE in place of the user's files; the last one overrides the others
        existing = [f for f in user_files if os.path.isfile(f)]
        if existing:
            out["PIP_CONFIG_FILE"] = existing[-1]
    return out


def _hermetic_environment() -> Path:
    from edgephi import user_cache  # os and pathlib only: nothing here caches a folder yet

    shared = {
        "EDGEPHI_KERNEL_CACHE": str(user_cache.kernel_cache_root()),
        "EDGEPHI_TEST_FIXTURES": os.environ.get("EDGEPHI_TEST_FIXTURES")
        or str(user_cache.cache_root() / "test-fixtures"),
        **_pip_user_state(),
    }
    home = Path(tempfile.mkdtemp(prefix="edgephi-tests-"))
    os.environ.update(shared)
    os.environ.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"),
                      XDG_DATA_HOME=str(home / ".local" / "share"), XDG_STATE_HOME=str(home / ".local" / "state"),
                      EDGEPHI_CACHE=str(home / ".cache" / "edgephi"))
    return home


HERMETIC_HOME = _hermetic_environment()  # at import: pytest imports this file before any test module

from edgephi.jit_cache import use_kernel_cache  # noqa: E402

# Kernels that tests call directly cache where load() puts them, keyed by every kernel source (numba's
# default, beside each file and keyed by that file alone, could hand back code built against an
# older version of another kernel file).
use_kernel_cache()

from . import fixtures  # noqa: E402  (after the environment is set)


def pytest_unconfigure(config):
    shutil.rmtree(HERMETIC_HOME, ignore_errors=True)



@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fixtures.smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' own reading of the SmolLM2 GGUF (float32, eval mode), built once per run (20 s):
    read it, never modify it."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def cl100k():
    return fixtures.tiktoken_encoding("cl100k_base")


@pytest.fixture(scope="session")
def o200k():
    return fixtures.tiktoken_encoding("o200k_base")


@pytest.fixture(scope="session")
def text_corpus() -> list[str]:
    return fixtures.text_corpus()


@pytest.fixture(scope="session")
def phi4_tokenizer_dir(tmp_path_factory) -> Path:
    return fixtures.write_phi4_tokenizer(tmp_path_factory.mktemp("phi4-tokenizer"))


@pytest.fixture(scope="session")
def phi4_mini_tokenizer_dir(tmp_path_factory) -> Path:
    return fixtures.write_phi4_mini_tokenizer(tmp_path_factory.mktemp("phi4-mini-tokenizer"))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(variant, dtype="float32", shards=True, hub_style=False, tokenizer=False) -> Path.

    Folders are shared by every test asking for the same arguments: read them, never modify.
    """
    built: dict[tuple, Path] = {}

    def make(variant: str, dtype: str = "float32", shards: bool = True,
             hub_style: bool = False, tokenizer: bool | str = False) -> Path:
        key = (variant, dtype, shards, hub_style, tokenizer)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{variant}-{dtype}")
            built[key] = fixtures.make_checkpoint(folder, variant, dtype, shards, hub_style, tokenizer)
        return built[key]

    return make


@pytest.fixture(scope="session")
def converted(checkpoint_factory, tmp_path_factory):
    """converted(variant, quant) -> that checkpoint converted to an edgephi folder at `quant` (f32:
    float32 embeddings too), built once per run: read it, never modify."""
    built = {}

    def get(variant, quant):
        if (variant, quant) not in built:
            from edgephi.convert import convert

            out = tmp_path_factory.mktemp("converted") / f"{variant}-{quant}"
            convert(checkpoint_factory(variant), out, quant=quant,
                    **({"embed_quant": "f32"} if quant == "f32" else {}))
            built[variant, quant] = out
        return built[variant, quant]

    return get


@pytest.fixture(scope="session")
def default_model_cache(smollm2_gguf) -> Path:
    """This run's EDGEPHI_CACHE holding the converted default model, as a first `edgephi chat` leaves
    it: converted once per run from the GGUF fixture, which is the default preset's pinned file."""
    from edgephi import models
    from edgephi.convert import convert
    from edgephi.default_model import default_model_path

    preset = models.default_model()
    assert fixtures.sha256_file(smollm2_gguf) == preset.pypi["member_sha256"], "not the default model's GGUF"
    out = default_model_path(preset)
    if not out.is_dir():
        convert(smollm2_gguf, out, quant=None, force=True)
    return Path(os.environ["EDGEPHI_CACHE"])


def pytest_itemcollected(item):
    """A slow test is an integration test too, so that `-m "not integration"` (which replaces
    addopts' `-m "not slow"`) leaves it out as well."""
    if item.get_closest_marker("slow"):
        item.add_marker(pytest.mark.integration)
