"""Chat templates: the model's Jinja template, rendered in a bounded sandbox (jinja_sandbox.py), to token ids.

The template sees the real messages, so `| trim`, `.split('</think>')`, `| length` render as in
transformers, yet special tokens come only from the template: in every string of the messages (dict
keys too) the first character of each special-token occurrence becomes a sentinel, a private-use
character found nowhere in the template, the messages or the special tokens. Lengths stay the same,
every special-token match in the output is the template's own, and sentinels are mapped back in the
ordinary text between matches before tokenizer.encode. Left over: a template that inspects or
escapes special-token text inside a message (`content.startswith('<|im_end|>')`, `| e`) handles the
sentinel instead; a token straddling a message and template text ("<|im_" + "start|>") counts as
the template's (no real template writes half a special token next to a message).
"""

from __future__ import annotations

import re
import sys
from itertools import chain

from jinja2 import TemplateSyntaxError

from .messages import check_messages
from .errors import EdgephiError
from .jinja_sandbox import CONTAINERS, Abort, Budget, SandboxEnvironment

_PRIVATE_USE = re.compile("[\ue000-\uf8ff\U000f0000-\U0010fffd]")


def _one_line(text) -> str:
    return " ".join(str(text).split())[:300]


def _map_strings(x, f):
    """A copy of x (messages: dicts, lists, tuples, sets) with f applied to every string, keys too."""
    if isinstance(x, str):
        return f(x)
    if isinstance(x, dict):
        return {_map_strings(k, f): _map_strings(v, f) for k, v in x.items()}
    if not isinstance(x, CONTAINERS):
        return x
    items = [_map_strings(y, f) for y in x]  # subclasses (a namedtuple, say) become their base type
    return tuple(items) if isinstance(x, tuple) else set(items) if isinstance(x, (set, frozenset)) else items


class ChatTemplate:
    """Renders messages to token ids; a message containing "<|im_start|>" keeps it as ordinary text.

    time_budget: seconds to compile, and again to render each prompt. size_budget: characters the
    template may write (and any value may hold) beyond twice the messages' own characters (some
    templates print a message twice, or through a macro)."""

    def __init__(self, source: str | None, tokenizer, generation_config: dict, *,
                 time_budget: float = 2.0, size_budget: int = 4 << 20, where: str | None = None):
        self._where = f"{where}: chat_template" if where else "chat template"  # what errors name
        if not source:
            raise EdgephiError(f"{where or 'this model'}: no chat template; use generate() with your own prompt")
        self.time_budget, self.size_budget, self.tokenizer = time_budget, size_budget, tokenizer
        self._env = SandboxEnvironment()
        self.template = self._run(Budget(size_budget, time_budget), lambda: self._env.from_string(source))
        ids = {v: k for k, v in tokenizer.special_tokens.items()}
        self.bos_token = ids.get(generation_config.get("bos_token_id"), "")
        self.eos_token = ids.get(generation_config.get("eos_token_id"), "")
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)  # longest match first
        self._special_re = re.compile("|".join(map(re.escape, specials)) or "(?!)")  # (?!) never matches
        self._reserved = source + "".join(specials)  # no sentinel may occur in these

    def _run(self, budget: Budget, work):
        previous = sys.gettrace()
        self._env.local.budget = budget
        sys.settrace(budget.trace)  # this thread only; a tracer that raises unsets itself
        try:
            return work()
        except Exception as exc:  # also TemplateSyntaxError, RecursionError, MemoryError, SecurityError
            where = f"line {exc.lineno}: " if isinstance(exc, TemplateSyntaxError) else ""
            raise EdgephiError(f"{self._where}: {where}{type(exc).__name__}: {_one_line(exc)}") from None
        except Abort as exc:
            raise EdgephiError(f"{self._where}: {_one_line(exc)}") from None
        finally:
            sys.settrace(previous)
            self._env.local.budget = None

    def _defuse(self, messages: list[dict]) -> tuple[list[dict], dict]:
        """Messages with the first character of each special-token occurrence replaced by a
        sentinel, and the str.translate table that maps sentinels back."""
        strings = []
        _map_strings(messages, strings.append)  # collects them
        if not any(map(self._special_re.search, strings)):
            return messages, {}
        used = set(_PRIVATE_USE.findall(self._reserved + "".join(strings)))
        free = (c for c in map(chr, chain(range(0xE000, 0xF900), range(0xF0000, 0x10FFFE))) if c not in used)
        sentinels = {first: next(free, None) for first in sorted({t[0] for t in self.tokenizer.special_tokens})}
        if None in sentinels.values():
            raise EdgephiError(f"{self._where}: the messages use every private-use character")

        def defuse(text):
            n = 1
            while n:  # again: with overlapping special tokens, one may be left behind
                text, n = self._special_re.subn(lambda m: sentinels[m[0][0]] + m[0][1:], text)
            return text

        return _map_strings(messages, defuse), {ord(s): first for first, s in sentinels.items()}

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, dict]:
        messages, restore = self._defuse(messages)
        budget = Budget(sys.maxsize, self.time_budget)
        budget.limit = self.size_budget + 2 * budget.size(messages)
        pieces = self.template.generate(messages=messages, tools=None, documents=None, bos_token=self.bos_token,
                                        eos_token=self.eos_token, add_generation_prompt=add_generation_prompt)
        return self._run(budget, lambda: "".join(budget.counted(pieces))), restore

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The prompt text, as transformers' apply_chat_template(tokenize=False) renders it."""
        text, restore = self._render(check_messages(messages), add_generation_prompt)
        return text.translate(restore) if restore else text

    def encode(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text, restore = self._render(check_messages(messages), add_generation_prompt)
        plain = (lambda s: s.translate(restore)) if restore else (lambda s: s)  # noqa: E731
        # the template's own special tokens only; the tokenizer gets the parts together, since
        # a special token may strip the whitespace after it (Phi-3's)
        parts, start = [], 0
        for match in self._special_re.finditer(text):
            parts += [plain(text[start:match.start()]), match.group()]
            start = match.end()
        return self.tokenizer.encode_parts(parts + [plain(text[start:])])
