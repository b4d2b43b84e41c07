"""A model folder's small files read and cross-checked before any weight is touched: the config,
the tokenizer and the generation settings must agree with each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFormatError
from .format import CONFIG_FILE, TOKENIZER_SPEC_FILE, ModelConfig, read_config, read_generation
from .tokenizer import Tokenizer


@dataclass
class ModelFolder:
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    generation: dict  # generation.json, checked (format.check_generation)


def read_model_folder(folder: str | Path) -> ModelFolder:
    folder = Path(folder)
    if not folder.exists():
        raise ModelFormatError(f"{folder}: no such model folder")
    config = read_config(folder)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer.n_vocab > config.vocab_size:
        raise ModelFormatError(f"{folder / TOKENIZER_SPEC_FILE}: {tokenizer.n_vocab} token ids, but the embedding "
                               f"in {folder / CONFIG_FILE} has only {config.vocab_size} rows")
    return ModelFolder(folder, config, tokenizer, read_generation(folder, config.vocab_size))
