"""Chat templates (the model's own Jinja template, sandboxed) and chat sessions that keep their
KV cache between turns, so a turn costs only its own tokens."""

from __future__ import annotations

import re
from typing import Iterator

from .errors import EdgephiError
from .generate import GenerationStats, check_max_new_tokens, check_stop, text_stream, token_stream
from .sampling import SamplingParams

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with a role in {ROLES} and a string content")
    return [dict(m) for m in messages]


class ChatTemplate:
    """Renders messages to token ids. Special tokens come only from the template's own text:
    a message that contains "<|im_start|>" keeps it as ordinary text."""

    def __init__(self, source: str | None, tokenizer, generation_config: dict):
        if not source:
            raise EdgephiError("this model has no chat template; use generate() with your own prompt")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # chat templates are Jinja

        def raise_exception(message):
            raise EdgephiError(f"chat template: {message}")

        # the environment transformers renders chat templates in
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise EdgephiError(f"chat template: {exc}") from None
        self.tokenizer = tokenizer
        ids = {v: k for k, v in tokenizer.special_tokens.items()}
        self.bos_token = ids.get(generation_config.get("bos_token_id"), "")
        self.eos_token = ids.get(generation_config.get("eos_token_id"), "")
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """The prompt text and the character spans that came from message contents."""
        marks = [f"\x00{i}\x00" for i in range(len(messages))]  # stand-ins to locate contents
        marked = [dict(m, content=mark) for m, mark in zip(messages, marks)]
        import jinja2

        try:
            text = self.template.render(messages=marked, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as exc:
            raise EdgephiError(f"chat template: {exc}") from None
        out, spans, pos = [], [], 0
        for piece in re.split("(\x00\\d+\x00)", text):
            if piece in marks:
                content = messages[marks.index(piece)]["content"]
                spans.append((pos, pos + len(content)))
                piece = content
            out.append(piece)
            pos += len(piece)
        return "".join(out), spans

    def encode(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text, spans = self.render(check_messages(messages), add_generation_prompt)
        ids, start = [], 0
        if self._special_re is not None:
            for match in self._special_re.finditer(text):
                if any(a < match.end() and match.start() < b for a, b in spans):
                    continue  # inside a message: ordinary text
                ids += self.tokenizer.encode(text[start:match.start()])
                ids.append(self.tokenizer.special_tokens[match.group()])
                start = match.end()
        return ids + self.tokenizer.encode(text[start:])


class ChatSession:
    """A conversation with one model: each send() renders the whole conversation with the chat
    template and feeds only the tokens the KV cache does not hold yet."""

    def __init__(self, model, *, system: str | None = None, max_new_tokens: int = 512, stop=None,
                 ignore_eos: bool = False, **sampling):
        self.model = model
        self.template = ChatTemplate(model.generation_config.get("chat_template"), model.tokenizer,
                                     model.generation_config)
        self.params = SamplingParams(**sampling)
        self.max_new_tokens = check_max_new_tokens(max_new_tokens)
        self.stop = check_stop(stop)
        self.ignore_eos = ignore_eos
        self.last_stats: GenerationStats | None = None
        self.reset(system)

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (keeping the system prompt unless a new one is given)."""
        if system is not None:
            self.system = system
        elif not hasattr(self, "system"):
            self.system = None
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._fed: list[int] = []  # every id this session put in the cache, in order

    def send(self, text: str) -> Iterator[str]:
        """Stream the assistant's reply to a user message; the reply joins the conversation."""
        if not isinstance(text, str):
            raise ValueError("the user message must be a string")
        self.messages.append({"role": "user", "content": text})
        ids = self.template.encode(self.messages, add_generation_prompt=True)
        cache = self.model.cache
        common = 0
        for a, b in zip(ids, self._fed):
            if a != b:
                break
            common += 1
        if cache.owner is not self or cache.next_pos != len(self._fed):
            common = 0  # another session or generate() used the cache since our last turn
        if common < len(self._fed) and not (cache.owner is self and cache.truncate(common)):
            common = 0
        if common == 0:
            cache.reset()
            cache.owner = self
            self._fed = []
        if common == 0 and self.system:
            system_ids = self.template.encode(self.messages[:1], add_generation_prompt=False)
            if ids[:len(system_ids)] == system_ids and len(system_ids) < cache.capacity // 2:
                cache.keep_prefix(len(system_ids))  # the ring never drops the system prompt
        stats = self.last_stats = GenerationStats()
        tokens = token_stream(self.model, ids[common:], params=self.params, max_new_tokens=self.max_new_tokens,
                              stop=self.stop, ignore_eos=self.ignore_eos, context_ids=self._fed[:common],
                              stats=stats)
        reply = []
        try:
            for piece in text_stream(self.model.tokenizer, tokens, self.stop):
                reply.append(piece)
                yield piece
        finally:
            tokens.close()
            self._fed = self._fed[:common] + stats.fed
            self.messages.append({"role": "assistant", "content": "".join(reply)})

    def __call__(self, text: str) -> str:
        return "".join(self.send(text))
