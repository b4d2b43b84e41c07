"""edgephi: run Phi language models quantized on CPUs, offline."""

__version__ = "0.1.0"
