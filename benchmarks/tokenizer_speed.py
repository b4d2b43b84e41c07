"""Encode speed of edgephi's SentencePiece tokenizer (Phi-3's vocabulary) next to tiktoken's cl100k.

    python benchmarks/tokenizer_speed.py [--megabytes 2] [--repetitions 5]

Both encode the same texts in this process, one thread: tests.fixtures.text_corpus() joined and
repeated to about --megabytes MB (English prose and Python source), and a Chinese/Japanese/Korean
text with no spaces of the same size. Prints the median MB/s (of UTF-8 input) of each, and ours
over cl100k's. The vocabulary is llama.cpp's models/ggml-vocab-phi-3.gguf, converted as edgephi
converts a Phi-3 GGUF; cl100k is tiktoken's own Encoding (encode_ordinary).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CJK = ("机器学习是人工智能的一个分支，它使计算机能够从数据中学习而无需明确编程。"
       "自然言語処理は、人間の言語をコンピュータで処理する技術です。"
       "대규모언어모델은방대한텍스트데이터로학습된신경망입니다。")


def megabytes_per_second(encode, text: str, repetitions: int) -> float:
    size = len(text.encode("utf-8")) / 1e6
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        encode(text)
        times.append(time.perf_counter() - started)
    return size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=2.0)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()

    from edgephi.convert.gguf_reader import GGUFFile
    from edgephi.convert.tokenizers import spec_from_gguf
    from edgephi.tokenizer import Tokenizer
    from tests import fixtures

    vocab = fixtures.llama_cpp_vocab("phi-3")
    with tempfile.TemporaryDirectory() as tmp:
        spec_from_gguf(GGUFFile(vocab), str(vocab)).save(Path(tmp))
        ours = Tokenizer.from_folder(tmp)
    cl100k = fixtures.tiktoken_encoding("cl100k_base")

    corpus = "\n\n".join(fixtures.text_corpus())
    texts = {"corpus": corpus, "cjk, no spaces": CJK}
    for name, text in texts.items():
        texts[name] = text * max(1, round(args.megabytes * 1e6 / len(text.encode("utf-8"))))
    print(f"{'text':16} {'MB':>6} {'edgephi phi-3 MB/s':>19} {'tiktoken cl100k MB/s':>21} {'ratio':>6}")
    for name, text in texts.items():
        ours_speed = megabytes_per_second(ours.encode, text, args.repetitions)
        cl100k_speed = megabytes_per_second(cl100k.encode_ordinary, text, args.repetitions)
        print(f"{name:16} {len(text.encode('utf-8')) / 1e6:6.2f} {ours_speed:19.2f} {cl100k_speed:21.2f} "
              f"{ours_speed / cl100k_speed:6.2f}")


if __name__ == "__main__":
    main()
