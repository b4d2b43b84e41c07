"""The edgephi converter (installed as edgephi.convert): Hugging Face checkpoints and GGUF files -> edgephi
model folders. The runtime never imports it."""

from .pipeline import convert

__all__ = ["convert"]
