"""Output constrained to JSON (a JSON Schema, or any JSON object): before each token is sampled,
every token that cannot continue a valid prefix of a matching document is masked out.

The grammar engine is llguidance (the `json` extra): it compiles the schema, and computes each
step's allowed tokens from the tokenizer's vocabulary, lazily and in Rust, faster than a step of
the model. Its tokenizer view of a model is built once (about a second on 200k tokens) and kept.
"""

from __future__ import annotations

import json
import threading
import weakref

import numpy as np

from .errors import EdgephiError

ANY_OBJECT = {"type": "object"}  # OpenAI's json_object mode: some JSON object
# Between tokens of the document: nothing, a space, or a newline and up to 20 spaces or tabs of
# indent, as llama.cpp's JSON grammars allow. llguidance's default takes any run of whitespace,
# where a small model can pile up newlines until its tokens run out.
WHITESPACE = r"(\x20|\x0A[\x20\x09]{0,20})?"
INTEGER_LIMIT = 10**15 - 1  # an integer without a bound gets this one (15 digits, as llama.cpp's grammars)
_LITERALS = ("const", "enum", "default", "examples")  # values, not schemas: left as they are
_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its llguidance view
_views_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise EdgephiError("JSON-constrained output needs llguidance: pip install 'edgephi[json]'") from None
    return llguidance


class _VocabularyView:
    """What llguidance reads of a vocabulary (its TokenizerWrapper protocol): every id's bytes,
    special tokens marked with a leading 0xFF, and an encoder."""

    def __init__(self, tokenizer, eos_ids: list[int], bos_id: int | None):
        special = {i: name for name, i in tokenizer.special_tokens.items() if i < tokenizer.n_vocab}
        self.tokens = [b"\xff" + special[i].encode() if i in special else tokenizer.decode_bytes([i])
                       for i in range(tokenizer.n_vocab)]
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = bos_id
        self.is_tokenizer_wrapper = True
        self._tokenizer = tokenizer

    def __call__(self, text) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


def _tokenizer_view(tokenizer, eos_ids: list[int], bos_id: int | None):
    llguidance = _llguidance()
    with _views_lock:
        key = (tuple(eos_ids), bos_id)
        views = _views.setdefault(tokenizer, {})
        if key not in views:
            views[key] = llguidance.LLTokenizer(_VocabularyView(tokenizer, eos_ids, bos_id), n_vocab=tokenizer.n_vocab,
                                                eos_token=list(eos_ids))
        return views[key]


def check_json_schema(schema) -> dict:
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON Schema as a dict, got {type(schema).__name__}")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"json_schema must be JSON-serialisable: {exc}") from None
    return schema


def bounded(schema):
    """The schema with every unbounded integer kept to INTEGER_LIMIT: an integer's digits are
    otherwise endless to the grammar, and a small model can write 1111... until its tokens end."""
    if isinstance(schema, list):
        return [bounded(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (v if k in _LITERALS else bounded(v)) for k, v in schema.items()}
    kinds = out.get("type")
    if kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds):
        if "maximum" not in out and "exclusiveMaximum" not in out:
            low = out.get("minimum", out.get("exclusiveMinimum", 0))
            out["maximum"] = max(INTEGER_LIMIT, low) if isinstance(low, (int, float)) else INTEGER_LIMIT
        if "minimum" not in out and "exclusiveMinimum" not in out:
            top = out.get("maximum", out.get("exclusiveMaximum", 0))
            out["minimum"] = min(-INTEGER_LIMIT, top) if isinstance(top, (int, float)) else -INTEGER_LIMIT
    return out


class GrammarConstraint:
    """One generation's constraint to an llguidance grammar: mask(logits) before sampling, then
    advance(token). JsonConstraint and the tool-call constraint (tool_calls.py) are its grammars."""

    def __init__(self, grammar: str, tokenizer, eos_ids: list[int], bos_id: int | None = None, *,
                 what: str = "json_schema"):
        llguidance = _llguidance()
        if not eos_ids:
            raise EdgephiError("constrained output needs the model's end-of-turn token, and it has none")
        view = _tokenizer_view(tokenizer, eos_ids, bos_id)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, view)
        if is_error:
            raise ValueError(f"{what} cannot be compiled: {' '.join(messages[0].split())}")
        self._matcher = llguidance.LLMatcher(view, grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"{what} cannot be compiled: {' '.join(self._matcher.get_error().split())}")
        self._n_vocab = tokenizer.n_vocab

    @property
    def complete(self) -> bool:
        """The document is whole: nothing but the end of the turn may follow."""
        return self._matcher.is_stopped()

    def mask(self, logits: np.ndarray) -> None:
        """Set to -inf, in place, the logits (V,) of every token that cannot come next."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self._n_vocab].view(bool)
        logits[:self._n_vocab][~allowed] = -np.inf

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise EdgephiError(f"constraint: token {token} was not allowed ({self._matcher.get_error()})")


class JsonConstraint(GrammarConstraint):
    """Output that is a JSON document matching `schema`."""

    def __init__(self, schema: dict, tokenizer, eos_ids: list[int], bos_id: int | None = None):
        grammar = _llguidance().LLMatcher.grammar_from_json_schema(
            bounded(check_json_schema(schema)), overrides={"whitespace_pattern": WHITESPACE})
        super().__init__(grammar, tokenizer, eos_ids, bos_id)


def lark_constraint(lark: str, tokenizer, eos_ids: list[int], bos_id: int | None = None, *,
                    what: str) -> GrammarConstraint:
    """A constraint to a grammar in llguidance's Lark syntax (`what` names it in errors)."""
    return GrammarConstraint(_llguidance().LLMatcher.grammar_from_lark(lark), tokenizer, eos_ids, bos_id, what=what)
