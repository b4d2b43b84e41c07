"""A streaming chat loop in a dozen lines: one user turn per input line, replies streamed.

    python examples/chat_loop.py [MODEL_FOLDER]      (default: edgephi's default model)
"""

import sys

import edgephi
from edgephi.default_model import ensure_default_model

folder = sys.argv[1] if len(sys.argv) > 1 else ensure_default_model(say=print)
chat = edgephi.load(folder).chat_session(system=None, max_new_tokens=128)
for line in sys.stdin:
    if line.strip():
        for piece in chat.send(line.strip()):
            print(piece, end="", flush=True)
        print()
