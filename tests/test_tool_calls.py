"""Tool calls in Phi-4-mini's format (#18 item 4): tools offered through the model's own chat
template (its rendering checked against transformers' apply_chat_template of the same template),
calls read out of constructed replies, and OpenAI's tool_calls in the server's answers, plain and
streamed, seen by the official openai client. The model is a hidden Phi-4-mini-shaped checkpoint
(random weights, Phi-4-mini's tokenizer and preset): its own replies are noise, so the replies with
calls are constructed."""

from __future__ import annotations

import json

import pytest

from edgephi.openai_protocol import ApiError, parse_chat_request
from edgephi.tool_calls import CALL_CLOSE, CALL_OPEN, calls_as_text, parse_reply, with_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


# -- without a model ---------------------------------------------------------------------------------

def test_calls_are_read_out_of_a_reply():
    text = CALL_OPEN + '[{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
        '{"name": "get_time", "parameters": {"city": "Oslo"}}]' + CALL_CLOSE
    content, calls = parse_reply(text)
    assert content is None
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}), ("function", "get_time", {"city": "Oslo"})]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    content, calls = parse_reply("Let me look. " + CALL_OPEN + '{"name": "get_time", "arguments": {}}' + CALL_CLOSE)
    assert content == "Let me look." and calls[0]["function"]["arguments"] == "{}"
    unclosed = CALL_OPEN + '[{"name": "get_time", "arguments": {"city": "Rome"}}]'  # the turn ended first
    assert parse_reply(unclosed)[1][0]["function"]["name"] == "get_time"


@pytest.mark.parametrize("text", ["Paris is sunny.", CALL_OPEN + "not json" + CALL_CLOSE,
                                  CALL_OPEN + '[{"arguments": {}}]' + CALL_CLOSE, CALL_OPEN + "[]" + CALL_CLOSE])
def test_a_reply_without_a_valid_call_stays_text(text):
    assert parse_reply(text) == (text.strip(), [])


def test_tools_go_on_the_system_message_and_calls_back_into_the_format():
    messages = [{"role": "user", "content": "hi"}]
    added = with_tools(messages, [WEATHER])
    assert added[0] == {"role": "system", "content": "", "tools": json.dumps([WEATHER["function"]])}
    kept = with_tools([{"role": "system", "content": "Be brief."}] + messages, [WEATHER, TIME])
    assert kept[0]["content"] == "Be brief." and json.loads(kept[0]["tools"])[1]["name"] == "get_time"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert calls_as_text([call]) == CALL_OPEN + '[{"name": "get_weather", "arguments": {"city": "Paris"}}]' + CALL_CLOSE
    assert parse_reply(calls_as_text([call]))[1][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_requests_with_tools_and_earlier_calls():
    body = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'}], "tools": [WEATHER]}
    req = parse_chat_request(body, "m")
    assert req.tools == [WEATHER]
    assert req.messages[1] == {"role": "assistant",
                               "content": CALL_OPEN + '[{"name": "get_weather", "arguments": {"city": "Paris"}}]' + CALL_CLOSE}
    assert req.messages[2] == {"role": "tool", "content": '{"sky": "sunny"}'}
    assert parse_chat_request({**body, "tool_choice": "none"}, "m").tools is None
    assert (req.tool_choice, req.parallel_tool_calls) == ("auto", True)
    required = parse_chat_request({**body, "tool_choice": "required", "parallel_tool_calls": False}, "m")
    assert (required.tools, required.tool_choice, required.parallel_tool_calls) == ([WEATHER], "required", False)
    named = parse_chat_request({**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "m")
    assert named.tool_choice == "get_weather"
    no_tools = {k: v for k, v in body.items() if k != "tools"}
    for bad, param in (({"tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
                       ({"tool_choice": "always"}, "tool_choice"), ({"tool_choice": {"name": "get_weather"}}, "tool_choice"),
                       ({"tool_choice": "required", "tools": None}, "tool_choice"),
                       ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
                       ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
                       ({"tools": [{"type": "function"}]}, "tools"), ({"tools": "get_weather"}, "tools")):
        with pytest.raises(ApiError) as info:
            parse_chat_request({**no_tools, "tools": body["tools"], **bad}, "m")
        assert (info.value.status, info.value.param) == (400, param)


# -- a hidden Phi-4-mini-shaped model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def phi4_mini(checkpoint_factory, tmp_path_factory):
    from edgephi.convert import convert

    src = checkpoint_factory("phi3_gqa_partial", tokenizer="phi4_mini")
    out = tmp_path_factory.mktemp("tools") / "phi4-mini-shaped"
    convert(src, out, quant="q4_0", preset="phi-4-mini-instruct")
    return src, out


@pytest.mark.integration
def test_the_prompt_with_tools_is_transformers_rendering_of_phi4_minis_template(phi4_mini):
    import transformers

    import edgephi
    from edgephi import models

    src, out = phi4_mini
    model = edgephi.load(out, context=512)
    template = models.presets()["phi-4-mini-instruct"].chat_template
    assert "tools" in template and model.generation_config["chat_template"] == template
    tok = transformers.AutoTokenizer.from_pretrained(src)
    conversation = [{"role": "user", "content": "What is the weather in Paris, and the time?"},
                    {"role": "assistant", "content": calls_as_text([{"function": {
                        "name": "get_weather", "arguments": '{"city": "Paris"}'}}])},
                    {"role": "tool", "content": '{"sky": "sunny", "celsius": 21}'}]
    for messages in (with_tools(conversation, [WEATHER, TIME]),
                     with_tools([{"role": "system", "content": "You answer briefly."}] + conversation, [WEATHER])):
        reference = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                            tokenize=True)
        reference = reference["input_ids"] if hasattr(reference, "keys") else reference
        assert model.chat_ids(messages) == list(reference)
        assert "<|tool|>" in model.tokenizer.decode(model.chat_ids(messages))


@pytest.mark.integration
def test_the_server_answers_with_tool_calls(phi4_mini, monkeypatch):
    openai = pytest.importorskip("openai")
    import edgephi
    from tests.test_server import serving

    model = edgephi.load(phi4_mini[1], context=512)
    reply = {"text": ""}
    real = model.stream_ids

    def constructed(ids, **options):  # the model's own generation runs, then says the constructed reply
        stats = options["stats"]
        list(real(ids, **{**options, "max_new_tokens": 2}))
        stats.generated_tokens = len(model.tokenizer.encode(reply["text"]))
        stats.finish_reason = "stop"
        yield from (reply["text"][i:i + 7] for i in range(0, len(reply["text"]), 7))

    monkeypatch.setattr(model, "stream_ids", constructed)
    with serving(model) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        ask = dict(model="smollm2", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME])
        reply["text"] = CALL_OPEN + '[{"name": "get_weather", "arguments": {"city": "Paris"}}]' + CALL_CLOSE
        done = client.chat.completions.create(**ask)
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        chunks = list(client.chat.completions.create(stream=True, **ask))
        streamed = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(streamed) == 1 and streamed[0].choices[0].delta.tool_calls[0].function.name == "get_weather"
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        reply["text"] = "It is sunny in Paris."
        plain = client.chat.completions.create(**ask).choices[0]
        assert plain.message.content == "It is sunny in Paris." and not plain.message.tool_calls
        assert plain.finish_reason == "stop"
        # the call and its result go back into the next request, in the model's format
        follow = client.chat.completions.create(model="smollm2", tools=[WEATHER], messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}])
        assert follow.choices[0].message.content == "It is sunny in Paris."


# Tools whose arguments end: the model is random, and a free string could run to max_tokens
FORECAST = {"type": "function", "function": {
    "name": "get_forecast", "description": "The weather in a city for some days",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}


def _valid_calls(calls, tools):
    """Each call names one of the tools, and its arguments are JSON that the tool's parameters
    schema accepts (jsonschema: a validator other than the grammar engine)."""
    import jsonschema

    specs = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.type == "function" and call.function.name in specs
        jsonschema.validate(json.loads(call.function.arguments), specs[call.function.name])
    return [call.function.name for call in calls]


@pytest.mark.integration
def test_the_call_grammar_accepts_what_jsonschema_accepts(phi4_mini):
    """Constructed replies fed token by token through the tool-call constraint: it lets through
    exactly those whose calls jsonschema finds valid and that the tool choice allows."""
    import jsonschema
    import numpy as np

    import edgephi
    from edgephi.constrained import lark_constraint
    from edgephi.tool_calls import call_grammar

    model = edgephi.load(phi4_mini[1], context=512)
    tok = model.tokenizer
    end = model.generation_config["eos_token_ids"]

    def accepted(text, name=None, parallel=True):
        constraint = lark_constraint(call_grammar([FORECAST, CLOCK], tok.special_tokens, name, parallel), tok, end,
                                     what="tools")
        logits = np.zeros(tok.n_vocab, np.float32)
        for token in tok.encode(text):
            logits[:] = 0
            constraint.mask(logits)
            if logits[token] == -np.inf:
                return False
            constraint.advance(token)
        return constraint.complete

    def block(*calls):
        return CALL_OPEN + json.dumps([{"name": n, "arguments": a} for n, a in calls]) + CALL_CLOSE

    def schema_valid(calls):
        specs = {t["function"]["name"]: t["function"]["parameters"] for t in (FORECAST, CLOCK)}
        try:
            for n, a in calls:
                jsonschema.validate(a, specs[n])
        except (KeyError, jsonschema.ValidationError):
            return False
        return True

    cases = [[("get_forecast", {"city": "Oslo", "days": 3})], [("get_time", {"zone": "CET"})],
             [("get_forecast", {"city": "Oslo", "days": 3, "unit": "celsius"})],
             [("get_forecast", {"city": "Oslo", "days": 9})], [("get_forecast", {"city": "Oslo"})],
             [("get_time", {"zone": "PST"})], [("get_time", {"zone": "UTC", "extra": 1})],
             [("get_forecast", {"city": "Llanfairpwllgwyngyll", "days": 2})], [("set_alarm", {})]]
    for calls in cases:
        assert accepted(block(*calls)) == schema_valid(calls), calls
    two = [("get_time", {"zone": "UTC"}), ("get_forecast", {"city": "Rome", "days": 1})]
    assert accepted(block(*two)) and not accepted(block(*two), parallel=False)
    assert accepted(block(two[0]), name="get_time") and not accepted(block(two[1]), name="get_time")
    assert not accepted(block(*two), name="get_time")
    assert not accepted("Sure. " + block(two[0])) and not accepted(CALL_OPEN + "[]" + CALL_CLOSE)
    with pytest.raises(ValueError, match="not among the tools"):
        call_grammar([FORECAST], tok.special_tokens, "get_time")


@pytest.mark.integration
def test_a_required_or_named_tool_choice_makes_the_model_call_it(phi4_mini):
    openai = pytest.importorskip("openai")
    import edgephi
    from tests.test_server import serving

    model = edgephi.load(phi4_mini[1], context=512)
    with serving(model) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        ask = dict(model="smollm2", messages=[{"role": "user", "content": "Weather in Oslo this week?"}],
                   tools=[FORECAST, CLOCK], max_tokens=120)
        # the random model left to itself does not call a tool
        assert not client.chat.completions.create(**ask, temperature=0).choices[0].message.tool_calls
        one = client.chat.completions.create(**ask, tool_choice="required", parallel_tool_calls=False, temperature=0)
        choice = one.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(_valid_calls(choice.message.tool_calls, [FORECAST, CLOCK])) == 1
        for seed in range(4):  # sampled: every reply is still a valid call of the named tool
            named = client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "get_time"}},
                                                   parallel_tool_calls=False, temperature=1.0, seed=seed)
            assert set(_valid_calls(named.choices[0].message.tool_calls, [FORECAST, CLOCK])) == {"get_time"}
            assert named.choices[0].finish_reason == "tool_calls"
        chunks = list(client.chat.completions.create(**ask, tool_choice="required", parallel_tool_calls=False,
                                                     temperature=0, stream=True))
        streamed = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert [(c.function.name, c.function.arguments) for c in streamed] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        broken = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**{**ask, "tools": [broken]}, tool_choice="required")
        assert info.value.body["param"] == "tools" and "cannot be compiled" in info.value.body["message"]


def test_the_call_markers_are_special_tokens_where_the_vocabulary_has_them():
    """Phi-4-mini's reply opens its block with the special token; a vocabulary without it gets the
    marker's text (which the model writes in ordinary tokens)."""
    from edgephi.tool_calls import call_grammar

    as_text = call_grammar([CLOCK], {}).splitlines()[0]
    as_tokens = call_grammar([CLOCK], {CALL_OPEN: 200025, CALL_CLOSE: 200026}).splitlines()[0]
    assert as_text == f'start: "{CALL_OPEN}" calls "{CALL_CLOSE}"'
    assert as_tokens == f"start: {CALL_OPEN} calls {CALL_CLOSE}"
