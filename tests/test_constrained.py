"""The schema edgephi hands to llguidance (edgephi/constrained.py), without a model: unbounded
integers get llama.cpp's 15-digit bound, everything else stays as the caller wrote it."""

from edgephi.constrained import INTEGER_LIMIT, bounded


def test_unbounded_integers_get_fifteen_digits_and_nothing_else_changes():
    schema = {"type": "object", "properties": {
        "n": {"type": "integer"}, "m": {"type": "integer", "minimum": 5}, "k": {"type": ["integer", "null"]},
        "kept": {"type": "integer", "minimum": 0, "maximum": 9},
        "x": {"type": "number"}, "type": {"type": "string"},
        "list": {"type": "array", "items": {"type": "integer", "exclusiveMaximum": 3}},
        "fixed": {"const": {"type": "integer"}}, "choice": {"enum": [{"type": "integer"}]}},
        "required": ["n"]}
    out = bounded(schema)
    props = out["properties"]
    assert props["n"] == {"type": "integer", "minimum": -INTEGER_LIMIT, "maximum": INTEGER_LIMIT}
    assert props["m"] == {"type": "integer", "minimum": 5, "maximum": INTEGER_LIMIT}
    assert props["k"]["maximum"] == INTEGER_LIMIT
    assert props["list"]["items"] == {"type": "integer", "exclusiveMaximum": 3, "minimum": -INTEGER_LIMIT}
    for same in ("kept", "x", "type", "fixed", "choice"):
        assert props[same] == schema["properties"][same]
    assert out["required"] == ["n"] and schema["properties"]["n"] == {"type": "integer"}  # the input is untouched
    huge = bounded({"type": "integer", "minimum": 10**20})
    assert huge["maximum"] == 10**20  # never a bound below the caller's minimum
