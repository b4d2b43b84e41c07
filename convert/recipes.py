"""Quant recipes: which format each quantizable tensor gets, by rules over edgephi tensor names.

A recipe is a comma-separated list of PATTERN=FORMAT rules, or the name of one in RECIPES. The first
rule whose pattern matches a tensor's name decides its format; tensors no rule matches keep what
--quant / --embed-quant give them. Patterns are shell-style (fnmatch) over names such as `embed`,
`output`, `layers.7.down`; a negative layer index counts from the end (`layers.-1.down` is the last
layer's). Example: `embed=q8_0,output=q8_0,layers.0.down=q8_0,layers.-1.down=q8_0,*=q4_0`.
"""

from __future__ import annotations

import fnmatch
import re

from edgephi.errors import EdgephiError
from edgephi.quant import QUANTIZABLE

QUANTIZED_KINDS = ("qkv", "o", "gate_up", "down", "embed", "output")
# Named recipes. "q4_0-down8": every linear q4_0 but the first and last layers' down, at q8_0. Of the
# mixes measured on the default model (benchmarks/recipe_kl.py, README) it saves the most KL per
# extra byte: 0.143 -> 0.128 for 1% more bytes, 0.0168 per MB, where every down at q8_0 saves 0.0034
# per MB and every qkv 0.0057.
RECIPES = {
    "q4_0-down8": "embed=q8_0,output=q8_0,layers.0.down=q8_0,layers.-1.down=q8_0,*=q4_0",
}
DEFAULT_RECIPE = "q4_0-down8"  # for a calibrated conversion given neither --quant nor --recipe
_LAYER = re.compile(r"^layers\.(-\d+)\.")


def parse_recipe(text: str, num_layers: int) -> list[tuple[str, str]]:
    """[(pattern, format)] of a recipe (a name from RECIPES or rules), negative layers resolved."""
    rules_text = RECIPES.get(text, text)
    rules = []
    for rule in filter(None, (r.strip() for r in rules_text.split(","))):
        pattern, sep, fmt = rule.partition("=")
        pattern, fmt = pattern.strip(), fmt.strip()
        if not sep or not pattern:
            raise EdgephiError(f"recipe rule {rule!r}: expected PATTERN=FORMAT (named recipes: {', '.join(RECIPES)})")
        if fmt not in QUANTIZABLE:
            raise EdgephiError(f"recipe rule {rule!r}: unknown format {fmt!r} (choose from {', '.join(QUANTIZABLE)})")
        m = _LAYER.match(pattern)
        if m:
            layer = num_layers + int(m.group(1))
            if layer < 0:
                raise EdgephiError(f"recipe rule {rule!r}: the model has only {num_layers} layers")
            pattern = f"layers.{layer}." + pattern[m.end():]
        rules.append((pattern, fmt))
    if not rules:
        raise EdgephiError("the recipe is empty (give PATTERN=FORMAT rules or a recipe name: "
                           f"{', '.join(RECIPES)})")
    return rules


def recipe_format(rules: list[tuple[str, str]], name: str) -> str | None:
    """The format the first matching rule gives tensor `name` (only kinds that can be quantized)."""
    if name.rsplit(".", 1)[-1] not in QUANTIZED_KINDS:
        return None
    return next((fmt for pattern, fmt in rules if fnmatch.fnmatchcase(name, pattern)), None)
