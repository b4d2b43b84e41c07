"""The tokenizer as stored in a model folder: tiktoken ranks plus a small JSON spec.

Shared by the converter (which writes it) and the runtime (which builds a tiktoken Encoding from it).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFormatError
from .format import TOKENIZER_RANKS_FILE, TOKENIZER_SPEC_FILE

SPEC_VERSION = 1


@dataclass
class TokenizerSpec:
    name: str
    pat_str: str  # tiktoken split regex (the `regex`/fancy-regex dialect)
    ranks: dict[bytes, int]  # byte string -> id; BPE merges the adjacent pair of lowest id first
    special_tokens: dict[str, int]  # produced by chat templates, never by ordinary text
    n_vocab: int  # ids >= n_vocab stand for bytes the vocabulary lacks; encoding drops them

    def save(self, folder: Path) -> None:
        lines = [base64.b64encode(tok) + b" " + str(rank).encode()
                 for tok, rank in sorted(self.ranks.items(), key=lambda kv: kv[1])]
        (folder / TOKENIZER_RANKS_FILE).write_bytes(b"\n".join(lines) + b"\n")
        spec = {"type": "tiktoken", "version": SPEC_VERSION, "name": self.name, "pat_str": self.pat_str,
                "n_vocab": self.n_vocab, "special_tokens": self.special_tokens}
        (folder / TOKENIZER_SPEC_FILE).write_text(json.dumps(spec, indent=1, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "TokenizerSpec":
        folder = Path(folder)
        spec_path, ranks_path = folder / TOKENIZER_SPEC_FILE, folder / TOKENIZER_RANKS_FILE
        try:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
            ranks = {}
            for line in ranks_path.read_bytes().splitlines():
                if line:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
        except FileNotFoundError as exc:
            raise ModelFormatError(f"{exc.filename}: missing tokenizer file") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{folder}: corrupt tokenizer files ({exc})") from None
        if spec.get("type") != "tiktoken" or spec.get("version", 0) > SPEC_VERSION:
            raise ModelFormatError(f"{spec_path}: unknown tokenizer type or newer version")
        return cls(spec["name"], spec["pat_str"], ranks, dict(spec["special_tokens"]),
                   int(spec["n_vocab"]))
