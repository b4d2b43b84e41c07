"""Session fixtures over tests/fixtures.py: each artifact is built once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import fixtures



@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fixtures.smollm2_gguf()


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
