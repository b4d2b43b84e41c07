"""Prompt-lookup decoding against plain decoding on prompts whose answers repeat their input (a code
edit, a summary that quotes, a repetition), greedy, in one process, alternating runs.

    python benchmarks/prompt_lookup.py [-m MODEL] [--lookup 3,6] [--max-tokens 128] [--repetitions 3]

Prints decode tokens/s (the reply's tokens over the time after the prompt's prefill), the
speed-up over plain decoding, and how many drafts were proposed and taken. Greedy replies must be
identical; the script checks it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgephi
from edgephi.chat_template import ChatTemplate
from edgephi.default_model import default_model_path
from edgephi.generate import GenerationStats

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
'''
PROMPTS = {
    "code edit": "Rename the variable subtotal to net_total in this Python function and return the whole "
                 f"function.\n\n{CODE}",
    "summary": "Summarise in one sentence, quoting the text: Edgephi runs Microsoft's Phi language models "
               "quantized, offline, on laptops and small boards, from Python, and it aims to beat the tools "
               "people use today on speed per core, memory and fidelity to the original model.",
    "repeat": "Repeat the following sentence exactly: The quick brown fox jumps over the lazy dog near the old "
              "river bank on a sunny day in early spring.",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--lookup", default="3,6")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    model = edgephi.load(args.model or default_model_path())
    template = ChatTemplate(model.generation_config.get("chat_template"), model.tokenizer, model.generation_config,
                            where=model.generation_file)
    settings = [0] + [int(k) for k in args.lookup.split(",")]
    print(f"{args.model or 'default model'}: decode tok/s, greedy, median of {args.repetitions} alternating runs")
    for name, text in PROMPTS.items():
        rendered = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        prompt = model.prompt_ids(rendered, special_tokens=True)
        speeds = {k: [] for k in settings}
        replies, drafts = {}, {}
        for _ in range(args.repetitions):
            for k in settings:
                stats = GenerationStats()
                started = time.perf_counter()
                replies[k] = list(model.generate_tokens(prompt, max_new_tokens=args.max_tokens, lookup=k, stats=stats))
                decode = time.perf_counter() - started - stats.prefill_seconds
                speeds[k].append((len(replies[k]) - 1) / decode)
                drafts[k] = (stats.drafts_proposed, stats.drafts_accepted)
        assert all(replies[k] == replies[0] for k in settings), f"{name}: a reply with drafts differs"
        plain = float(np.median(speeds[0]))
        cells = [f"plain {plain:6.1f}"]
        for k in settings[1:]:
            speed = float(np.median(speeds[k]))
            cells.append(f"lookup {k}: {speed:6.1f} ({speed / plain:4.2f}x, {drafts[k][1]}/{drafts[k][0]} drafts taken)")
        print(f"{name:10} {len(replies[0]):4} tokens  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
