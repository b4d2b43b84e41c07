"""Chat messages as apps give them: a list of {"role": ..., "content": ...} dicts, checked once."""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages, allow_empty: bool = False) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not (messages or allow_empty):
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with a role in {ROLES} and a string content")
    return [dict(m) for m in messages]
