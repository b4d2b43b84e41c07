"""OpenAI's HTTP API as data: request bodies checked into edgephi's generation options, and the
response, chunk and error bodies built from a generation's results. No HTTP and no model here:
edgephi/server.py carries these over Starlette."""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field

from .constrained import ANY_OBJECT
from .generate import GenerationStats
from .logprobs import MAX_TOP_LOGPROBS, TokenLogprobs
from .tool_calls import calls_as_text

MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; llama.cpp's server any number)
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs limit in OpenAI's API
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class ApiError(Exception):
    """A request the server refuses: the HTTP status and OpenAI's error body fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class GenerationRequest:
    """What either endpoint asks of the model, checked."""

    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage counts
    max_tokens: int | None = None  # None: until the context is full
    stop: tuple[str, ...] = ()
    sampling: dict = field(default_factory=dict)  # SamplingParams' fields the request set
    logprobs: int | None = None  # top alternatives per token; None: no logprobs at all
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions
    echo: bool = False  # completions: the prompt's text before the completion
    ignore_eos: bool = False  # llama.cpp's extension: go on past the end-of-turn token (benchmarks)
    json_schema: dict | None = None  # response_format's: the output must be a document matching it
    tools: list[dict] | None = None  # chat: OpenAI's function tools offered to the model
    # tool_choice: "auto" (the model may call a tool), "required" (it must) or a tool's name (it
    # must call that one); the last two hold the reply to a grammar of calls
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True  # False: a required or named tool_choice makes exactly one call


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


class _Fields:
    """Reads one request body's fields, each refused with OpenAI's 400 naming it."""

    def __init__(self, body):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.body = body

    def get(self, name: str, check, want: str, default=None):
        value = self.body.get(name)
        if value is None:
            return default
        if not check(value):
            raise ApiError(400, f"{name} must be {want}, got {value!r}"[:300], param=name)
        return value

    def unsupported(self, name: str, allowed, why: str) -> None:
        value = self.body.get(name)
        if value is not None and not allowed(value):
            raise ApiError(400, f"{name} {why}", param=name)


def _check_model(fields: _Fields, model_id: str) -> None:
    name = fields.get("model", lambda v: isinstance(v, str), "a string")
    if name is not None and name != model_id:
        raise ApiError(404, f"The model '{name[:100]}' does not exist; this server runs '{model_id}'",
                       param="model", code="model_not_found")


def _common(fields: _Fields, request: GenerationRequest, max_tokens_names: tuple[str, ...]) -> None:
    f = fields
    request.stream = f.get("stream", lambda v: isinstance(v, bool), "true or false", False)
    options = f.get("stream_options", lambda v: isinstance(v, dict), "an object", {})
    if options and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options")
    request.include_usage = usage
    for name in max_tokens_names:
        value = f.get(name, _is_int, "an integer >= 0")
        if value is not None:
            if value < 0:
                raise ApiError(400, f"{name} must be an integer >= 0, got {value}", param=name)
            request.max_tokens = value
    stop = f.get("stop", lambda v: isinstance(v, (str, list)), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    request.stop = tuple(s for s in stop if s)
    request.ignore_eos = f.get("ignore_eos", lambda v: isinstance(v, bool), "true or false", False)
    f.get("n", lambda v: v == 1, "1 (one choice per request)")
    for name in ("presence_penalty", "frequency_penalty"):
        f.unsupported(name, lambda v: v == 0, "is not supported; use repetition_penalty (> 1 discourages repeats)")
    f.unsupported("logit_bias", lambda v: v == {}, "is not supported")
    sampling = request.sampling
    checks = {
        "temperature": (_is_number, "a number >= 0", lambda v: v >= 0),
        "top_p": (_is_number, "a number in (0, 1]", lambda v: 0 < v <= 1),
        "top_k": (_is_int, "an integer >= 0", lambda v: v >= 0),  # llama.cpp's and ollama's extensions
        "min_p": (_is_number, "a number in [0, 1)", lambda v: 0 <= v < 1),
        "repetition_penalty": (_is_number, "a number > 0", lambda v: v > 0),
        "seed": (_is_int, "an integer", lambda v: True),
    }
    for name, (kind, want, ok) in checks.items():
        value = f.get(name, lambda v, kind=kind, ok=ok: kind(v) and ok(v), want)
        if value is not None:
            sampling[name] = value


def _message_text(i: int, content) -> str:
    """A message's content: a string, or OpenAI's list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, got {kind!r}",
                               param="messages")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def parse_chat_request(body, model_id: str) -> GenerationRequest:
    """POST /v1/chat/completions' body, checked. Raises ApiError."""
    f = _Fields(body)
    _check_model(f, model_id)
    request = GenerationRequest()
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    request.messages = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        role = ROLE_ALIASES.get(role, role)
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user, assistant or tool, got "
                           f"{role!r}", param="messages")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls:
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise ApiError(400, f"messages[{i}].tool_calls must be a list of function calls", param="messages")
            content = "" if m.get("content") is None else _message_text(i, m.get("content"))
            request.messages.append({"role": role, "content": content + calls_as_text(calls)})
        else:
            request.messages.append({"role": role, "content": _message_text(i, m.get("content"))})
    _common(f, request, ("max_tokens", "max_completion_tokens"))
    if f.get("logprobs", lambda v: isinstance(v, bool), "true or false", False):
        request.logprobs = f.get("top_logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
                                 f"an integer in [0, {MAX_TOP_LOGPROBS}]", 0)
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    request.json_schema = _response_format(body.get("response_format"))
    tools = f.get("tools", lambda v: isinstance(v, list) and all(
        isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str) for t in v), "a list of {type: function, function: {name, ...}}")
    choice = _tool_choice(body.get("tool_choice"), tools)
    request.tools = tools if tools and choice != "none" else None
    request.tool_choice = "auto" if choice == "none" else choice
    request.parallel_tool_calls = f.get("parallel_tool_calls", lambda v: isinstance(v, bool), "true or false", True)
    if request.tool_choice != "auto" and request.json_schema is not None:
        raise ApiError(400, "response_format cannot be combined with a required or named tool_choice",
                       param="response_format")
    return request


def _tool_choice(value, tools: list[dict] | None) -> str:
    """tool_choice: "none", "auto", "required", or the name of the function that
    {"type": "function", "function": {"name": ...}} names, which must be among the tools."""
    if value is None or value in ("none", "auto"):
        return value or "auto"
    if value == "required":
        name = None
    elif (isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict)
          and isinstance(value["function"].get("name"), str)):
        name = value["function"]["name"]
    else:
        raise ApiError(400, f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                       f"\"function\": {{\"name\": ...}}}}, got {value!r}"[:300], param="tool_choice")
    if not tools:
        raise ApiError(400, "tool_choice requires a tool, but the request has no tools", param="tool_choice")
    if name is not None and name not in {t["function"]["name"] for t in tools}:
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools"[:300],
                       param="tool_choice")
    return "required" if name is None else name


def _response_format(value) -> dict | None:
    """response_format: text (None), json_object (any JSON object) or json_schema's schema."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_OBJECT)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema must be an object with a \"schema\" object",
                           param="response_format")
        return schema
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", param="response_format")


def parse_completion_request(body, model_id: str) -> GenerationRequest:
    """POST /v1/completions' body, checked: one prompt (text or token ids). Raises ApiError."""
    f = _Fields(body)
    _check_model(f, model_id)
    request = GenerationRequest(max_tokens=16)  # OpenAI's default for completions
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        request.prompt = prompt
    elif isinstance(prompt, str):
        request.prompt = prompt
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                       param="prompt")
    _common(f, request, ("max_tokens",))
    request.echo = f.get("echo", lambda v: isinstance(v, bool), "true or false", False)
    request.logprobs = f.get("logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_COMPLETION_LOGPROBS,
                             f"an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
    if request.echo and request.logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported (the prompt's logprobs are not computed)",
                       param="echo")
    f.get("best_of", lambda v: v == 1, "1")
    f.unsupported("suffix", lambda v: v == "", "is not supported")
    request.json_schema = _response_format(body.get("response_format"))  # llama.cpp's server takes it here too
    return request


@dataclass
class ResponseIds:
    """What every body and chunk of one response repeats."""

    model: str
    fingerprint: str
    chat: bool
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}


def usage(stats: GenerationStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def _token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    data = tokenizer.decode_bytes([token])
    return data.decode("utf-8", errors="replace"), list(data)


def chat_logprobs(tokenizer, entries: list[TokenLogprobs]) -> dict:
    """OpenAI chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
    def one(token, logprob):
        text, data = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": data}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(tokenizer, entries: list[TokenLogprobs], offset: int) -> dict:
    """Legacy completions' logprobs: parallel lists, top alternatives as {token text: logprob}.
    offset: the text's length before the first of these tokens (text_offset)."""
    tokens, offsets = [], []
    for e in entries:
        text = _token_text(tokenizer, e.token)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token_text(tokenizer, t)[0]: lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}


def chat_response(ids: ResponseIds, text: str | None, stats: GenerationStats, logprobs: dict | None,
                  tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {**ids.head("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                         "finish_reason": "tool_calls" if tool_calls else stats.finish_reason}],
            "usage": usage(stats)}


def chat_chunk(ids: ResponseIds, delta: dict, *, finish_reason: str | None = None, logprobs: dict | None = None,
               with_usage: bool = False) -> dict:
    chunk = {**ids.head("chat.completion.chunk"),
             "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None  # OpenAI's shape: null on every chunk but the last, which carries the counts
    return chunk


def completion_response(ids: ResponseIds, text: str, stats: GenerationStats, logprobs: dict | None) -> dict:
    return {**ids.head("text_completion"),
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": stats.finish_reason}],
            "usage": usage(stats)}


def completion_chunk(ids: ResponseIds, text: str, *, finish_reason: str | None = None,
                     logprobs: dict | None = None, with_usage: bool = False) -> dict:
    chunk = {**ids.head("text_completion"),
             "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(ids: ResponseIds, stats: GenerationStats) -> dict:
    obj = "chat.completion.chunk" if ids.chat else "text_completion"
    return {**ids.head(obj), "choices": [], "usage": usage(stats)}
