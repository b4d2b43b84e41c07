"""JSON-constrained output (#18 item 3) on the real default model: every reply, greedy or sampled,
through the Python API or the server's response_format, parses with Python's json and validates
with the `jsonschema` package against the schema asked for; schemas the engine cannot compile are
refused before anything is generated."""

from __future__ import annotations

import json

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

import edgephi  # noqa: E402
from edgephi.generate import GenerationStats  # noqa: E402

pytestmark = pytest.mark.integration  # the real SmolLM2 model

NAME = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {"person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}},
                                  "required": ["name", "age"], "additionalProperties": False},
                       "city": NAME},
        "required": ["person", "city"], "additionalProperties": False},
    "enums": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", "XL"]},
                       "in_stock": {"type": "boolean"}},
        "required": ["colour", "size", "in_stock"], "additionalProperties": False},
    "arrays": {
        "type": "object",
        "properties": {"primes": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5},
                       "tags": {"type": "array", "items": NAME, "maxItems": 3}},
        "required": ["primes", "tags"], "additionalProperties": False},
    "numbers": {
        "type": "object",
        "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                       "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                       "discount": {"type": "number"}},
        "required": ["price", "quantity"], "additionalProperties": False},
    "array of objects": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"title": NAME, "year": {"type": "integer"}},
                  "required": ["title", "year"], "additionalProperties": False}},
}
PROMPTS = ["Describe a person who lives in a city, as JSON.", "Give me a T-shirt from the shop, as JSON.",
           "List a few prime numbers and some tags, as JSON.", "What does an apple cost? Answer as JSON.",
           "Name some books with their years, as JSON."]


@pytest.fixture(scope="module")
def model(default_model_cache):
    from edgephi import models
    from edgephi.default_model import default_model_path

    return edgephi.load(default_model_path(models.default_model()), context=1024)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_reply_parses_and_validates(model, name):
    schema = SCHEMAS[name]
    replies = []
    for prompt in PROMPTS:
        for options in ({"temperature": 0}, {"temperature": 0.9, "seed": 1}, {"temperature": 1.2, "seed": 2}):
            stats = GenerationStats()
            text = "".join(model.chat_stream([{"role": "user", "content": prompt}], json_schema=schema,
                                             max_new_tokens=300, stats=stats, **options))
            assert stats.finish_reason == "stop", (prompt, options, text)
            replies.append(text)
    for text in replies:
        jsonschema.validate(json.loads(text), schema)  # raises on any reply that does not match
    assert len(set(replies)) > 3  # the prompts and samples gave different documents


def test_plain_generation_is_not_constrained(model):
    """The reference: without the schema the same prompt's reply is no JSON of that schema, so the
    constraint is what makes the replies above valid."""
    text = model.chat([{"role": "user", "content": PROMPTS[1]}], max_new_tokens=80)
    with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(text), SCHEMAS["enums"])


def test_completions_and_token_ids_take_the_schema_too(model):
    ids = list(model.generate_tokens(model.prompt_ids("The answer, as JSON:"), json_schema=SCHEMAS["numbers"],
                                     max_new_tokens=120))
    jsonschema.validate(json.loads(model.tokenizer.decode(ids)), SCHEMAS["numbers"])
    text = model.generate("Some JSON:", json_schema={"type": "object"}, max_new_tokens=200, temperature=0.7, seed=4)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}, "cannot be compiled"),
    ({"type": "string", "pattern": "(unclosed"}, "cannot be compiled"),
    ("not a schema", "must be a JSON Schema"),
])
def test_a_schema_the_engine_cannot_compile_is_refused(model, schema, message):
    with pytest.raises(ValueError, match=message):
        model.json_constraint(schema)
    with pytest.raises(ValueError, match=message):
        model.generate("x", json_schema=schema)
