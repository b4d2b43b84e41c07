"""The edgephi converter: Hugging Face checkpoints and GGUF files -> edgephi model folders."""

from .pipeline import convert

__all__ = ["convert"]
