"""Batch generation over a file of prompts (one per line), writing JSON lines with the reply and speed.

    python examples/batch_generate.py PROMPTS.txt OUT.jsonl [MODEL_FOLDER]
"""

import json
import sys

import edgephi
from edgephi.default_model import ensure_default_model

prompts_file, out_file = sys.argv[1], sys.argv[2]
model = edgephi.load(sys.argv[3] if len(sys.argv) > 3 else ensure_default_model(say=print))
with open(prompts_file, encoding="utf-8") as prompts, open(out_file, "w", encoding="utf-8") as out:
    for prompt in filter(None, (line.strip() for line in prompts)):
        chat = model.chat_session(max_new_tokens=64)  # a fresh conversation per prompt
        reply = chat(prompt)
        stats = chat.last_stats
        out.write(json.dumps({"prompt": prompt, "reply": reply, "tokens": stats.generated_tokens,
                              "decode_tok_s": round(stats.decode_tok_s, 1)}) + "\n")
