"""What JSON-constrained output costs per token (#18): the constraint's time (llguidance's token
mask, applying it, advancing its parser) against the decode step's, on one model.

    python benchmarks/json_overhead.py [MODEL] [--replies 5]

Generates replies to a few prompts under a schema with nested objects, enums, arrays and numbers,
timing every mask() and advance() call, and prints milliseconds per token of each and the
constraint's share of a token's time; then the same prompts unconstrained, for decode tok/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgephi  # noqa: E402
from edgephi import constrained  # noqa: E402
from edgephi.generate import GenerationStats  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30}, "kind": {"enum": ["book", "film", "song"]},
    "year": {"type": "integer"}, "rating": {"type": "number"},
    "people": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "role": {"enum": ["author", "director", "singer"]}},
        "required": ["name", "role"]}}},
    "required": ["name", "kind", "year", "rating", "people"]}
PROMPTS = ["Describe your favourite book as JSON.", "Describe a famous film as JSON.", "Describe a song as JSON.",
           "Tell me about a classic novel, as JSON.", "A film from the 1990s, as JSON."]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--replies", type=int, default=5)
    args = parser.parse_args()
    if args.model is None:
        from edgephi.default_model import ensure_default_model
        args.model = ensure_default_model(print)
    model = edgephi.load(args.model, context=1024, prefix_cache=0)
    spent = {"mask": 0.0, "advance": 0.0}
    for name in spent:
        original = getattr(constrained.JsonConstraint, name)

        def timed(self, *a, _original=original, _name=name):
            started = time.perf_counter()
            try:
                return _original(self, *a)
            finally:
                spent[_name] += time.perf_counter() - started
        setattr(constrained.JsonConstraint, name, timed)
    started = time.perf_counter()
    model.json_constraint(SCHEMA)
    print(f"{model.folder.name}: compiling the schema (and, the first time, the vocabulary's view) "
          f"{(time.perf_counter() - started) * 1e3:.0f} ms")
    tokens, decode_s = 0, 0.0
    for prompt in PROMPTS[:args.replies]:
        stats = GenerationStats()
        "".join(model.chat_stream([{"role": "user", "content": prompt}], json_schema=SCHEMA, max_new_tokens=300,
                                  stats=stats))
        tokens += stats.generated_tokens
        decode_s += stats.decode_seconds
    plain_tokens, plain_s = 0, 0.0
    for prompt in PROMPTS[:args.replies]:
        stats = GenerationStats()
        "".join(model.chat_stream([{"role": "user", "content": prompt}], max_new_tokens=120, stats=stats))
        plain_tokens += stats.generated_tokens
        plain_s += stats.decode_seconds
    per = {k: v / tokens * 1e3 for k, v in spent.items()}
    per_token = decode_s / tokens * 1e3
    print(f"constrained: {tokens} tokens, {per_token:.2f} ms per token in all; mask {per['mask']:.3f} ms, "
          f"advance {per['advance']:.3f} ms: the constraint is {(per['mask'] + per['advance']) / per_token:.1%} "
          f"of a token's time")
    print(f"unconstrained: {plain_tokens} tokens, {plain_s / plain_tokens * 1e3:.2f} ms per token")


if __name__ == "__main__":
    main()
