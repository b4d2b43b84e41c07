"""Tool (function) calls in Phi-4-mini's format, as OpenAI's API carries them.

The tools are offered in the system message, which Phi-4-mini's chat template renders as
`<|system|>...<|tool|>[tools as JSON]<|/tool|><|end|>`; the model calls them with
`<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>` in its reply. Here the tools of a
request go into the messages the template sees, an assistant's earlier calls are written back in
that format, and a reply's calls are read out of its text. Where the reply must call a tool
(OpenAI's tool_choice "required" or a named tool), call_grammar is the grammar it is held to.
"""

from __future__ import annotations

import json
import re
import secrets

from .constrained import WHITESPACE, bounded

CALL_OPEN, CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
_CALLS = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.S)


def template_takes_tools(source: str | None) -> bool:
    """Whether a chat template renders a message's tools at all (Phi-4-mini's does)."""
    return bool(source) and "tools" in source


def with_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The messages with the tools' function specs (OpenAI's {"type": "function", "function": {...}}
    unwrapped, as Phi-4-mini's examples list them) on the system message, one added if none."""
    specs = json.dumps([t["function"] for t in tools], ensure_ascii=False)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "tools": specs}] + messages[1:]
    return [{"role": "system", "content": "", "tools": specs}] + messages


def calls_as_text(calls: list[dict]) -> str:
    """An assistant's earlier tool calls (OpenAI's tool_calls) in the model's own format."""
    out = []
    for call in calls:
        function = call["function"]
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass  # written back as the string it was
        out.append({"name": function["name"], "arguments": arguments})
    return CALL_OPEN + json.dumps(out, ensure_ascii=False) + CALL_CLOSE


def parse_reply(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply: every `<|tool_call|>...<|/tool_call|>` whose JSON is a
    call or a list of calls ({"name", "arguments" or "parameters"}) becomes an OpenAI tool call;
    the text around them (None if empty) is the content. A block that is not such JSON stays text."""
    calls, kept, at = [], [], 0
    for match in _CALLS.finditer(text):
        found = _read_calls(match.group(1))
        if found is None:
            continue
        kept.append(text[at:match.start()])
        at = match.end()
        calls += found
    kept.append(text[at:])
    content = "".join(kept).strip()
    return (content or None), calls


def _read_calls(body: str) -> list[dict] | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append({"id": "call_" + secrets.token_hex(12), "type": "function",
                      "function": {"name": item["name"],
                                   "arguments": arguments if isinstance(arguments, str)
                                   else json.dumps(arguments, ensure_ascii=False)}})
    return calls or None


def call_grammar(tools: list[dict], special_tokens: dict[str, int], name: str | None = None,
                 parallel: bool = True) -> str:
    """llguidance's Lark grammar of a reply that is one block of calls, CALL_OPEN [calls]
    CALL_CLOSE: at least one call (exactly one unless `parallel`), each {"name": a tool's name,
    "arguments": matching that tool's parameters}; with `name`, calls of that tool only. The
    block's markers are the vocabulary's special tokens where it has them, else their text."""
    specs = [t["function"] for t in tools]
    if name is not None:
        specs = [s for s in specs if s["name"] == name]
        if not specs:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": [_call_schema(s) for s in specs]},
             "x-guidance": {"whitespace_pattern": WHITESPACE}}
    if not parallel:
        calls["maxItems"] = 1
    marker = {m: m if m in special_tokens else json.dumps(m) for m in (CALL_OPEN, CALL_CLOSE)}  # token, or text
    return (f"start: {marker[CALL_OPEN]} calls {marker[CALL_CLOSE]}\n"
            f"calls: %json {json.dumps(bounded(calls))}\n")


def _call_schema(spec: dict) -> dict:
    arguments = spec.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": spec["name"]}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}
