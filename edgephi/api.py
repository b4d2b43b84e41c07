"""The generation API apps use (prompts, streaming, chat), the same over every backend.

A LanguageModel holds a Backend (edgephi/backend.py: the numba kernels or onnxruntime) and adds
everything that does not depend on the runtime. Every generation owns its sequence, so one loaded
model serves many threads and conversations at once without mixing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property

import numpy as np

from .backend import Backend, check_context, check_tokens
from .chat import ChatSession
from .constrained import GrammarConstraint, JsonConstraint, lark_constraint
from .generate import (DEFAULT_MAX_NEW_TOKENS, GenerationStats, check_max_new_tokens, check_stop, text_stream,
                       token_stream)
from .errors import EdgephiError
from .kv_cache import DEFAULT_SINKS, KV_BLOCK, kv_slot_bytes
from .logprobs import check_top_logprobs
from .messages import check_messages
from .prefix_cache import PrefixCache
from .sampling import SamplingParams
from .sequence import Sequence
from .session_file import SavedSession, model_identity, read_session, save_session
from .tool_calls import call_grammar


class LanguageModel:
    """What edgephi.load returns, on either backend."""

    def __init__(self, backend: Backend, prefix_cache: int | None = None):
        """prefix_cache: bytes of prompt KV kept for other sequences to reuse (PrefixCache); default
        one full KV cache's (kv_bytes()), 0 for none. The numba backend only."""
        self.backend = backend
        self.folder, self.config, self.tokenizer = backend.folder, backend.config, backend.tokenizer
        self.generation_config, self.generation_file = backend.generation_config, backend.generation_file
        self.context, self.kv_dtype = backend.context, backend.kv_dtype
        self.prefix_cache: PrefixCache | None = None
        if backend.name == "numba":
            budget = self.kv_bytes() if prefix_cache is None else prefix_cache
            rope = self.config.rope_scaling
            self.prefix_cache = PrefixCache(budget, self.config.original_max_position_embeddings if rope else None)

    def sequence(self, context: int | None = None, *, sinks: int = DEFAULT_SINKS) -> Sequence:
        """A new token sequence with a KV cache of its own (`context` tokens, default the model's).
        sinks: first positions a full cache keeps (the numba backend's ring; onnxruntime never wraps)."""
        if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {sinks!r}")
        capacity = self.context if context is None else check_context(context)
        return Sequence(self.backend, self.backend.new_cache(capacity, sinks))

    def logits(self, ids) -> np.ndarray:
        """float32 (len(ids), V) logits of `ids` in a fresh context."""
        return self.backend.logits(self.check_tokens(list(ids)))

    def check_tokens(self, tokens) -> np.ndarray:
        """tokens as int64 (T,), refused unless every id lies inside the embedding."""
        return check_tokens(tokens, self.config.vocab_size)

    def kv_bytes(self, context: int | None = None) -> int:
        """Bytes of one sequence's KV cache when full (the numba backend maps pages only as tokens
        fill them): context x layers x 2 (K, V) x kv heads x (head dim x bytes per value, and for int8
        a float16 scale per block of KV_BLOCK)."""
        return (self.context if context is None else context) * kv_slot_bytes(self.config, self.kv_dtype)

    def prompt_ids(self, prompt, special_tokens: bool = False) -> list[int]:
        """Token ids of a prompt (text or ids), with BOS when the model wants one. An empty prompt
        becomes [bos] when the model has a BOS token, else it is an error."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, allow_special=special_tokens)
        elif isinstance(prompt, (list, tuple, np.ndarray)) and all(isinstance(i, (int, np.integer)) for i in prompt):
            ids = [int(i) for i in prompt]
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        bos = self.generation_config.get("bos_token_id")
        if bos is not None and (self.generation_config.get("add_bos_token") or not ids) and ids[:1] != [bos]:
            ids = [bos] + ids
        if not ids:
            raise ValueError("prompt is empty and the model has no BOS token to start from")
        return ids

    def generate_tokens(self, prompt_ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stop=None, ignore_eos: bool = False,
                        stats: GenerationStats | None = None, logprobs: int | None = None, json_schema=None,
                        **sampling) -> Iterator[int]:
        """Token ids continuing prompt_ids in a fresh context. sampling: temperature, top_k,
        top_p, min_p, repetition_penalty, seed (see SamplingParams). logprobs=K records each id's
        log-probability and the K likeliest ids' in stats.logprobs (TokenLogprobs). json_schema:
        as in stream_ids."""
        return self._fresh_stream(self.prompt_ids(list(prompt_ids)), max_new_tokens, check_stop(stop), ignore_eos,
                                  stats, logprobs, sampling, json_schema)

    def _fresh_stream(self, ids, max_new_tokens, stop, ignore_eos, stats, logprobs, sampling,
                      json_schema=None) -> Iterator[int]:
        params = SamplingParams(**sampling)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        logprobs = None if logprobs is None else check_top_logprobs(logprobs)
        constraint = None
        if json_schema is not None:
            constraint = json_schema if isinstance(json_schema, GrammarConstraint) else self.json_constraint(json_schema)
        return token_stream(self, self.sequence(), ids, params=params, max_new_tokens=max_new_tokens, stop=stop,
                            ignore_eos=ignore_eos, stats=stats, logprobs=logprobs, constraint=constraint)

    def json_constraint(self, schema: dict) -> JsonConstraint:
        """A generation's JSON constraint for `schema` (a JSON Schema dict; {"type": "object"} for
        any object), compiled now: a ValueError here names what the engine cannot compile. Pass
        it as json_schema= to one generation."""
        return JsonConstraint(schema, self.tokenizer, *self._constraint_ends())

    def tool_call_constraint(self, tools: list[dict], name: str | None = None,
                             parallel: bool = True) -> GrammarConstraint:
        """A reply that is one block of tool calls in the model's format (tool_calls.py), each a call
        of one of `tools` (OpenAI's function tools) with arguments matching its parameters, or of
        the tool `name` only (OpenAI's tool_choice "required" and named tool); one call only
        unless `parallel`. Compiled now (a ValueError names what cannot be); pass it as
        json_schema= to one generation."""
        grammar = call_grammar(tools, self.tokenizer.special_tokens, name, parallel)
        return lark_constraint(grammar, self.tokenizer, *self._constraint_ends(), what="tools")

    def _constraint_ends(self) -> tuple[list[int], int | None]:
        """A constraint's end-of-turn ids (which end a finished document) and BOS id."""
        cfg = self.generation_config
        return list(cfg.get("eos_token_ids", [])), cfg.get("bos_token_id")

    def stream(self, prompt, *, special_tokens: bool = False, **options) -> Iterator[str]:
        """Text pieces (always whole UTF-8 characters) continuing `prompt` (see stream_ids)."""
        return self.stream_ids(self.prompt_ids(prompt, special_tokens), **options)

    def stream_ids(self, ids, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stop=None, ignore_eos: bool = False,
                   stats: GenerationStats | None = None, logprobs: int | None = None, json_schema=None,
                   **sampling) -> Iterator[str]:
        """Text pieces continuing exactly these token ids (no BOS added) in a fresh context; the text
        ends before the first stop string. logprobs: as in generate_tokens. json_schema: a JSON
        Schema (dict) the output must match, or a json_constraint() of one: only tokens that keep
        it a valid prefix of a matching document are sampled, and it ends when the document does
        (needs the json extra, llguidance)."""
        stop = check_stop(stop)
        tokens = self._fresh_stream(self.check_tokens(ids).tolist(), max_new_tokens, stop, ignore_eos, stats, logprobs,
                                    sampling, json_schema)
        return text_stream(self.tokenizer, tokens, stop)

    @cached_property
    def chat_template(self):
        """The model's chat template (generation_config.json's), compiled once and shared by threads."""
        from .chat_template import ChatTemplate  # jinja2 is imported only by apps that chat

        return ChatTemplate(self.generation_config.get("chat_template"), self.tokenizer, self.generation_config,
                            where=self.generation_file)

    def chat_ids(self, messages) -> list[int]:
        """Token ids of a conversation in the chat template, ending where the assistant's reply starts."""
        return self.chat_template.encode(check_messages(messages), add_generation_prompt=True)

    def chat_stream(self, messages, **options) -> Iterator[str]:
        """Text pieces of the assistant's reply to `messages` (any roles, in any order the template
        accepts), in a fresh context: one request, as an OpenAI-style server takes it (see stream_ids)."""
        return self.stream_ids(self.chat_ids(messages), **options)

    def generate(self, prompt, **options) -> str:
        return "".join(self.stream(prompt, **options))

    def chat_session(self, *, system: str | None = None, resume=None, **options) -> ChatSession:
        """A conversation with a KV cache of its own, kept between turns (see ChatSession).
        resume: a file ChatSession.save wrote with this model, to go on from."""
        return ChatSession(self, system=system, resume=resume, **options)

    @cached_property
    def identity(self) -> str:
        """sha256 of the model's config and weights: what a saved session is checked against."""
        return model_identity(self.folder)

    def _numba_cache_only(self, what: str) -> None:
        if self.backend.name != "numba":
            raise EdgephiError(f"{what} needs the numba backend (this model runs on {self.backend.name})")

    def write_session(self, path, cache, *, messages: list[dict], system: str | None, fed: list[int]) -> None:
        self._numba_cache_only("saving a chat session")
        save_session(path, identity=self.identity, kernels=self._kernels, kv_dtype=self.kv_dtype, cache=cache,
                     messages=messages, system=system, fed=fed)

    def read_session(self, path) -> SavedSession:
        self._numba_cache_only("resuming a chat session")
        cfg = self.config
        blocks = cfg.num_kv_heads * -(-cfg.head_dim // KV_BLOCK) if self.kv_dtype == "int8" else 0
        return read_session(path, identity=self.identity, kernels=self._kernels, kv_dtype=self.kv_dtype,
                            layers=cfg.num_layers, kv_width=cfg.num_kv_heads * cfg.head_dim, kv_blocks=blocks,
                            vocab_size=cfg.vocab_size)

    @property
    def _kernels(self) -> str:
        """What computes this model's KV, bit for bit: edgephi's version and the ISA."""
        from . import __version__

        return f"edgephi {__version__} {self.backend.isa.name}"

    def chat(self, messages, **options) -> str:
        """The assistant's reply to a list of messages, in a fresh context."""
        session = ChatSession(self, **options)
        session.messages = check_messages(messages)[:-1]
        last = messages[-1]
        if last["role"] != "user":
            raise ValueError("the last message must be from the user")
        return session(last["content"])
