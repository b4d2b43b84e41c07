"""OpenAI request bodies read into generation options (edgephi/openai_protocol.py), without a
model or a server: the forms OpenAI's API reference allows, and OpenAI's error shape for the rest."""

from __future__ import annotations

import pytest

from edgephi.openai_protocol import ApiError, parse_chat_request, parse_completion_request

USER = [{"role": "user", "content": "hi"}]


def refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, "m")
    return info.value


def test_chat_fields_map_to_generation_options():
    req = parse_chat_request({"model": "m", "messages": USER, "temperature": 0.7, "top_p": 0.9, "seed": 5,
                              "max_completion_tokens": 12, "stop": "END", "top_k": 40, "min_p": 0.1,
                              "repetition_penalty": 1.2, "presence_penalty": 0, "frequency_penalty": 0, "n": 1,
                              "logprobs": True, "top_logprobs": 4, "stream": True,
                              "stream_options": {"include_usage": True}, "user": "ignored", "ignore_eos": True}, "m")
    assert req.sampling == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.1, "repetition_penalty": 1.2,
                            "seed": 5}
    assert (req.max_tokens, req.stop, req.logprobs, req.stream, req.include_usage) == (12, ("END",), 4, True, True)
    assert req.ignore_eos
    plain = parse_chat_request({"messages": USER}, "m")  # no model named: the one served
    assert (plain.max_tokens, plain.logprobs, plain.stream, plain.sampling) == (None, None, False, {})
    assert parse_chat_request({"messages": USER, "logprobs": True}, "m").logprobs == 0


def test_chat_messages_take_openai_forms():
    req = parse_chat_request({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}],
         "name": "ann"},
        {"role": "assistant", "content": "Hi."}]}, "m")
    assert req.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, there"},
                            {"role": "assistant", "content": "Hi."}]


def test_response_formats():
    def schema(fmt):
        return parse_chat_request({"messages": USER, "response_format": fmt}, "m").json_schema

    assert schema({"type": "text"}) is None and schema(None) is None
    assert schema({"type": "json_object"}) == {"type": "object"}
    wanted = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert schema({"type": "json_schema", "json_schema": {"name": "x", "schema": wanted, "strict": True}}) == wanted
    assert parse_completion_request({"prompt": "x", "response_format": {"type": "json_object"}}, "m").json_schema


def test_completion_prompts_and_defaults():
    assert parse_completion_request({"prompt": "x"}, "m").max_tokens == 16  # OpenAI's default
    assert parse_completion_request({"prompt": ["x"]}, "m").prompt == "x"
    assert parse_completion_request({"prompt": [1, 2, 3]}, "m").prompt == [1, 2, 3]
    assert parse_completion_request({"prompt": [[1, 2]]}, "m").prompt == [1, 2]
    req = parse_completion_request({"prompt": "x", "logprobs": 3, "max_tokens": 0, "stop": ["a", ""]}, "m")
    assert (req.logprobs, req.max_tokens, req.stop) == (3, 0, ("a",))


@pytest.mark.parametrize("body,status,param", [
    ({"model": "other", "messages": USER}, 404, "model"),
    ({"messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": USER, "max_tokens": True}, 400, "max_tokens"),
    ({"messages": USER, "temperature": float("nan")}, 400, "temperature"),
    ({"messages": USER, "top_k": 1.5}, 400, "top_k"),
    ({"messages": USER, "stop": ["a"] * 17}, 400, "stop"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": USER, "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"messages": USER, "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"messages": [{"role": "user"}]}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}}, 400,
     "response_format"),
    ({"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
])
def test_chat_refusals_name_the_field(body, status, param):
    error = refused(parse_chat_request, body)
    assert (error.status, error.param) == (status, param)
    assert error.body()["error"]["message"] == error.message and error.body()["error"]["param"] == param


@pytest.mark.parametrize("body,param", [
    ({}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [1.5]}, "prompt"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"), ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "best_of": 2}, "best_of"), ({"prompt": "x", "suffix": "y"}, "suffix"),
])
def test_completion_refusals_name_the_field(body, param):
    error = refused(parse_completion_request, body)
    assert (error.status, error.param) == (400, param)


def test_a_body_that_is_not_an_object():
    assert refused(parse_chat_request, [1]).status == 400
