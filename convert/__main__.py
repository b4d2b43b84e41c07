"""`python -m edgephi.convert SRC OUT ...`: the same command as `edgephi convert`."""

from edgephi.cli import convert

convert(prog_name="python -m edgephi.convert")
