"""GGUF files of the Phi family as llama.cpp writes them (issue #14), built once and cached.

For each family (FAMILIES: Phi-3-mini, Phi-3.5-mini, Phi-4, Phi-4-mini and a Phi-3.5 whose hidden
size is not a multiple of 256) this module makes:
  - a seeded random Hugging Face checkpoint, written by transformers' Phi3ForCausalLM with the
    family's real tokenizer (Phi-3's SentencePiece vocabulary, cl100k or o200k);
  - the GGUF that llama.cpp's own converter (convert_hf_to_gguf.py) writes from it, f32 or bf16;
  - K-quant mixes of the f32 GGUF made by llama.cpp's quantizer (llama-cpp-python's
    llama_model_quantize), so the files hold what Hub GGUFs hold: Q4_K, Q5_K, Q6_K, and Q5_0 /
    Q5_1 / Q8_0 where a row is not a multiple of 256;
  - malformed GGUFs the converter must refuse (BAD_GGUFS).
Each artifact lies in tests.fixtures.cache_dir()/phi-gguf/, in a folder keyed by a hash of
everything that determines it, built in a temporary folder and moved into place with os.replace.

Plain functions, usable from scripts: `python -m tests.gguf_fixtures` builds everything (about four
minutes on 2 cores) and prints each file's tensor types (slowly: gguf-py takes ~30 s to read a
200k-token vocabulary). torch, transformers and llama_cpp are imported only where needed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tests import fixtures
from tests.phi3_tokenizer import phi3_vocab, phi3_vocab_gguf, write_phi3_tokenizer

# Bump when this module's output changes for reasons the keys below do not see.
BUILD_VERSION = 1
CONVERT_TIMEOUT = 1200  # seconds for llama.cpp's converter or quantizer on one small model
WEIGHT_STD = 0.02  # as Phi's own initializer_range and close to trained weights' spread
QK_STD = 0.06  # the q and k rows of qkv_proj: large enough that attention is far from uniform


# ---------------------------------------------------------------------------------------------
# Families

PHI3_CHAT_TEMPLATE = (  # Phi-3-mini-4k-instruct's, as llama.cpp's ggml-vocab-phi-3.gguf holds it
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}"
    "{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _longrope(rotary_dim: int, original: int, theta: float = 10000.0, partial: float = 1.0) -> dict:
    """LongRoPE with distinct increasing factors, so a swapped, reversed or misindexed list shows."""
    n = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": theta, "partial_rotary_factor": partial,
            "original_max_position_embeddings": original,
            "short_factor": [round(1.0 + 0.05 * i, 4) for i in range(n)],
            "long_factor": [round(1.5 + 0.75 * i, 4) for i in range(n)]}


@dataclass(frozen=True)
class Family:
    repo: str  # the checkpoint folder's name, as on the Hub: llama.cpp derives general.name from it
    tokenizer: str  # "phi3" (SentencePiece), "phi4" (cl100k) or "phi4_mini" (o200k)
    config: dict  # Phi3Config arguments (transformers 5 layout)
    add_bos_token: bool = False  # phi3 tokenizer only
    eos_token_ids: tuple[int, ...] = ()  # generation_config.json's list (Phi-3 stops on several)

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def long_context(self) -> int | None:
        """original_max_position_embeddings when the family has LongRoPE (past it, long factors)."""
        rope = self.config["rope_parameters"]
        return rope["original_max_position_embeddings"] if rope["rope_type"] == "longrope" else None


_SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, rms_norm_eps=1e-5,
              initializer_range=WEIGHT_STD, tie_word_embeddings=False)
_PHI3_IDS = dict(vocab_size=32064, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)

# Small but K-quantable (hidden and intermediate sizes multiples of 256), each with its family's
# real tokenizer and the features of the real config.json.
FAMILIES: dict[str, Family] = {
    # MHA, full rotary, no scaling; the real config's 2047-token window is wider than any prompt here.
    "phi3": Family("Phi-3-mini-4k-instruct", "phi3", dict(
        _SMALL, **_PHI3_IDS, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        add_bos_token=True, eos_token_ids=(32000, 32001, 32007)),
    # LongRoPE switching to long factors past 64 positions (context 512: attention factor
    # sqrt(1 + ln 8 / ln 64)), and a 48-token sliding window.
    "phi3.5": Family("Phi-3.5-mini-instruct", "phi3", dict(
        _SMALL, **_PHI3_IDS, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, original_max_position_embeddings=64, sliding_window=48,
        rope_parameters=_longrope(64, 64)),
        eos_token_ids=(32000, 32001, 32007)),
    # GQA 8/2 with 32-dim heads, rope_theta 250000, no window (null), cl100k + Phi-4's added tokens.
    "phi4": Family("phi-4", "phi4", dict(
        _SMALL, vocab_size=100352, bos_token_id=100257, eos_token_id=100265, pad_token_id=100349,
        num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=16384, original_max_position_embeddings=16384, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 250000.0})),
    # GQA 4/2, partial rotary 0.75 (48 of 64 dims), tied embeddings, LongRoPE past 64 positions,
    # the real config's 262144-token window, o200k + Phi-4-mini's added tokens.
    "phi4-mini": Family("Phi-4-mini-instruct", "phi4_mini", dict(
        _SMALL, vocab_size=200064, bos_token_id=199999, eos_token_id=199999, pad_token_id=199999,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=512, original_max_position_embeddings=64, sliding_window=262144,
        rope_parameters=_longrope(48, 64, partial=0.75)),
        eos_token_ids=(199999, 200020)),
    # Phi-3.5-like with hidden size 384 (a multiple of 32, not of 256): llama.cpp's K-quant mixes
    # fall back to Q5_0 / Q5_1 / Q8_0 for every tensor whose rows have 384 values.
    "phi3.5-d384": Family("Phi-3.5-mini-d384", "phi3", dict(
        _SMALL, **_PHI3_IDS, hidden_size=384, num_attention_heads=6, num_key_value_heads=6,
        max_position_embeddings=512, original_max_position_embeddings=64, sliding_window=None,
        rope_parameters=_longrope(64, 64)),
        eos_token_ids=(32000, 32001, 32007)),
}


# name -> (family, how it is made): "f32"/"bf16" = convert_hf_to_gguf --outtype, else a llama.cpp
# ftype quantized from the family's f32 GGUF. The large vocabularies (Phi-4's 100352 and Phi-4-mini's
# 200064 rows) cost seconds per conversion, so they get one K-quant mix each.
GGUF_FILES: dict[str, tuple[str, str]] = {
    **{f"{family}-f32": (family, "f32") for family in FAMILIES},
    "phi3-q4_k_m": ("phi3", "Q4_K_M"),
    "phi3-q6_k": ("phi3", "Q6_K"),
    "phi3.5-q4_k_m": ("phi3.5", "Q4_K_M"),
    "phi3.5-q5_k_m": ("phi3.5", "Q5_K_M"),
    "phi3.5-bf16": ("phi3.5", "bf16"),
    "phi4-q4_k_m": ("phi4", "Q4_K_M"),
    "phi4-mini-q4_k_m": ("phi4-mini", "Q4_K_M"),
    "phi3.5-d384-q4_k_m": ("phi3.5-d384", "Q4_K_M"),  # Q5_0 and Q8_0 where rows have 384 values
    "phi3.5-d384-q5_k_m": ("phi3.5-d384", "Q5_K_M"),  # Q5_1 and Q8_0 there
}
FLOAT_OUTTYPES = ("f32", "bf16")


# ---------------------------------------------------------------------------------------------
# The cache


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(name: str, key: str, build) -> Path:
    """cache_dir()/phi-gguf/<name>-<key>/, made by build(folder) on first use. The folder is built
    under a temporary name beside it and renamed into place, so it is complete whenever it exists;
    two processes building at once both succeed and one copy is kept."""
    root = fixtures.cache_dir() / "phi-gguf"
    final = root / f"{name}-{key}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{key}.", dir=root))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the folder from other users of a shared cache
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _versions(*packages: str) -> dict[str, str]:
    import importlib.metadata

    return {p: importlib.metadata.version(p) for p in packages}


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints


def _family_seed(family: str) -> int:
    return zlib.crc32(family.encode())


def _tokenizer_key(family: Family) -> dict:
    if family.tokenizer == "phi3":
        return {"phi3_vocab": fixtures.sha256_file(phi3_vocab_gguf()), "add_bos": family.add_bos_token}
    return {"tiktoken_tokenizer_format": fixtures._TOKENIZER_FORMAT, "name": family.tokenizer}


@functools.cache
def _hf_key(name: str) -> str:
    family = FAMILIES[name]
    return _digest(BUILD_VERSION, name, asdict(family), _tokenizer_key(family), WEIGHT_STD, QK_STD,
                   _versions("torch", "transformers", "tokenizers", "sentencepiece"))


def _random_weights(model, config, seed: int) -> None:
    """Every weight N(0, WEIGHT_STD) (q and k rows of qkv_proj: QK_STD); norm weights 1 + N(0, 0.2)
    so that a dropped or doubled norm weight shows. Tied embeddings are one tensor."""
    import torch

    head_dim = config.hidden_size // config.num_attention_heads
    q_and_k = (config.num_attention_heads + config.num_key_value_heads) * head_dim
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=gen))
                if name.endswith("qkv_proj.weight"):
                    p[:q_and_k] *= QK_STD / WEIGHT_STD


def _build_hf(name: str, tmp: Path) -> None:
    import torch
    import transformers

    family = FAMILIES[name]
    folder = tmp / family.repo
    config = transformers.Phi3Config(**copy.deepcopy(family.config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_family_seed(name))
        model = transformers.Phi3ForCausalLM(config).eval()
    _random_weights(model, config, _family_seed(name))
    if family.eos_token_ids:
        model.generation_config.eos_token_id = list(family.eos_token_ids)
    model.save_pretrained(folder)
    if family.tokenizer == "phi3":
        write_phi3_tokenizer(folder, add_bos_token=family.add_bos_token,
                             chat_template=PHI3_CHAT_TEMPLATE if family.add_bos_token else PHI35_CHAT_TEMPLATE)
    elif family.tokenizer == "phi4":
        fixtures.write_phi4_tokenizer(folder)
    else:
        fixtures.write_phi4_mini_tokenizer(folder)
        # llama.cpp's converter reads a Phi3ForCausalLM vocabulary as byte-level BPE only when
        # tokenizer_class is exactly "GPT2Tokenizer" (as in microsoft/Phi-4-mini-instruct);
        # anything else sends it to the SentencePiece path, which needs tokenizer.model.
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "GPT2Tokenizer"},
                                   indent=2, ensure_ascii=False) + "\n")


def hf_checkpoint(family: str) -> Path:
    """The family's Hugging Face checkpoint folder (float32 safetensors, config, tokenizer files)."""
    folder = _cached(f"hf-{family}", _hf_key(family), functools.partial(_build_hf, family))
    return folder / FAMILIES[family].repo


# ---------------------------------------------------------------------------------------------
# GGUF files: llama.cpp's converter and quantizer


@functools.cache
def _file_key(name: str) -> str:
    family, how = GGUF_FILES[name]
    if how in FLOAT_OUTTYPES:
        return _digest(BUILD_VERSION, _hf_key(family), fixtures.LLAMA_CPP_SDIST, how)
    return _digest(BUILD_VERSION, _file_key(f"{family}-f32"), _versions("llama_cpp_python"), how)


def _run(cmd: list[str], log: Path, what: str, cwd: Path | None = None) -> None:
    """Runs a command with a timeout; its output goes to `log` (kept beside the artifact)."""
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=CONVERT_TIMEOUT, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what}: no result after {CONVERT_TIMEOUT} s") from exc
    log.write_text(f"$ {' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _convert_hf(family: str, outtype: str, tmp: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py, with the gguf-py vendored beside it."""
    src = fixtures.llama_cpp_source()
    out = tmp / f"{family}-{outtype}.gguf"
    _run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_checkpoint(family)),
          "--outtype", outtype, "--outfile", str(out)], tmp / "convert.log",
         f"convert_hf_to_gguf.py {family} --outtype {outtype}", cwd=tmp)
    if FAMILIES[family].tokenizer == "phi3":
        _check_phi3_vocab(out)


def _check_phi3_vocab(path: Path) -> None:
    """The converter made of the rebuilt tokenizer files what it made of microsoft's: the pieces,
    scores and types of ggml-vocab-phi-3.gguf for ids 0-32010. (The 53 unused ids after them are
    UNUSED today; that older file has them UNKNOWN.)"""
    import gguf

    fields = gguf.GGUFReader(path).fields
    ours = [fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type")]
    for key, got, want in zip(("tokens", "scores", "token_type"), ours, phi3_vocab()):
        if len(got) != len(want) or got[:32011] != want[:32011]:
            raise RuntimeError(f"{path}: tokenizer.ggml.{key} differs from {phi3_vocab_gguf().name}'s")


_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.nthread = 2
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
if sys.argv[4] != "-":
    params.output_tensor_type = int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(f"llama_model_quantize returned {rc}" if rc else 0)
"""


def quantize(src: Path, out: Path, ftype: str, log: Path, output_tensor_type: int | None = None) -> Path:
    """llama.cpp's quantizer (in a subprocess: its log goes to `log`, a crash cannot take the caller
    with it). ftype: a LLAMA_FTYPE_MOSTLY_* suffix such as "Q4_K_M"."""
    _run([sys.executable, "-c", _QUANTIZE, str(src), str(out), ftype,
          "-" if output_tensor_type is None else str(output_tensor_type)], log, f"llama_model_quantize {ftype} {src}")
    return out


def _quantize_family(name: str, tmp: Path) -> None:
    family, ftype = GGUF_FILES[name]
    quantize(gguf_file(f"{family}-f32"), tmp / f"{name}.gguf", ftype, tmp / "quantize.log")


def gguf_file(name: str) -> Path:
    """The GGUF file GGUF_FILES[name] describes."""
    family, how = GGUF_FILES[name]
    if how in FLOAT_OUTTYPES:
        build = functools.partial(_convert_hf, family, how)
    else:
        build = functools.partial(_quantize_family, name)
    return _cached(f"gguf-{name}", _file_key(name), build) / f"{name}.gguf"


def family_of(name: str) -> str:
    return GGUF_FILES[name][0]


def tensor_types(path) -> dict[str, str]:
    """tensor name -> ggml type name, as gguf.GGUFReader reads the file."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def metadata(path, *keys: str) -> dict:
    """Selected metadata values of a GGUF (strings, numbers, or lists for arrays)."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    return {k: fields[k].contents() for k in keys if k in fields}


# ---------------------------------------------------------------------------------------------
# Reference results (transformers and gguf.quants), cached so that tests need neither torch nor a
# 30-second gguf.GGUFReader pass over a 200k-token vocabulary once they exist

LONG_PROMPT = 80  # past Phi-3.5's and Phi-4-mini's original context (64) and Phi-3.5's window (48)


def prompts() -> list[list[int]]:
    """Token-id prompts for every family (ids below 32000 exist in all three vocabularies): a short
    one, the first half of the long one (within the original context), and the long one."""
    long = fixtures.random_ids(LONG_PROMPT, seed=14, vocab=32000)
    return [fixtures.random_ids(7, seed=15, vocab=32000), long[:LONG_PROMPT // 2], long]


def _ref_versions() -> dict[str, str]:
    return _versions("torch", "transformers", "gguf", "numpy")


def hf_model(family: str):
    """transformers' float32 model of the family's checkpoint (eval mode)."""
    import torch
    import transformers

    return transformers.Phi3ForCausalLM.from_pretrained(hf_checkpoint(family), dtype=torch.float32).eval()


def _forward(model, ids: list[int]) -> np.ndarray:
    return fixtures.hf_logits(model, ids).astype(np.float32)


def _save_logits(folder: Path, logits: list[np.ndarray]) -> None:
    np.savez(folder / "logits.npz", *logits)


def _load_logits(folder: Path) -> list[np.ndarray]:
    with np.load(folder / "logits.npz") as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def hf_reference_logits(family: str) -> list[np.ndarray]:
    """transformers' float32 logits (T, V) of the family's Hugging Face checkpoint, one per prompt."""
    def build(tmp):
        model = hf_model(family)
        _save_logits(tmp, [_forward(model, ids) for ids in prompts()])

    key = _digest(BUILD_VERSION, _hf_key(family), prompts(), _ref_versions())
    return _load_logits(_cached(f"ref-hf-{family}", key, build))


def hf_names_by_gguf_name(model, n_blocks: int) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, by gguf-py's own table of llama.cpp's names
    (phi3 keeps the fused qkv_proj as attn_qkv and gate_up_proj as ffn_up, rows unpermuted)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, n_blocks)
    out = {}
    for name, _ in model.named_parameters():  # a tied lm_head is embed_tokens, listed once
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None or gguf_name in out:
            raise RuntimeError(f"gguf-py maps {name} to {gguf_name}")
        out[gguf_name] = name
    return out


def dequantized_hf_model(name: str):
    """The family's transformers model with every weight replaced by the GGUF file's tensor as
    gguf.quants.dequantize reads it; also returns gguf_tensor_digests' table for the file."""
    import gguf
    import torch

    family = family_of(name)
    model = hf_model(family)
    by_gguf = hf_names_by_gguf_name(model, model.config.num_hidden_layers)
    params = dict(model.named_parameters())
    digests, placed = {}, set()
    for t in gguf.GGUFReader(gguf_file(name)).tensors:
        values = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        digests[t.name] = {"type": t.tensor_type.name, "shape": list(values.shape),
                           "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
                           "first": values.reshape(-1)[:8].tolist()}  # to show in a failure
        if t.name.startswith("rope_factors_"):  # LongRoPE factors: the config's, checked by the logits
            continue
        p = params[by_gguf[t.name]]
        if tuple(p.shape) != values.shape:
            raise RuntimeError(f"{name}: {t.name} is {values.shape}, {by_gguf[t.name]} is {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(values.copy()))  # GGUFReader maps the file read-only
        placed.add(by_gguf[t.name])
    if placed != set(params):
        raise RuntimeError(f"{name}: no GGUF tensor for {sorted(set(params) - placed)}")
    return model, digests


def _build_gguf_reference(name: str, tmp: Path) -> None:
    model, digests = dequantized_hf_model(name)
    _save_logits(tmp, [_forward(model, ids) for ids in prompts()])
    (tmp / "tensors.json").write_text(json.dumps(digests, indent=1) + "\n")


def _gguf_reference(name: str) -> Path:
    key = _digest(BUILD_VERSION, _file_key(name), prompts(), _ref_versions())
    return _cached(f"ref-{name}", key, functools.partial(_build_gguf_reference, name))


def gguf_reference_logits(name: str) -> list[np.ndarray]:
    """transformers' logits, one per prompt, with the GGUF file's own (dequantized) weights."""
    return _load_logits(_gguf_reference(name))


def gguf_tensor_digests(name: str) -> dict[str, dict]:
    """tensor -> {"type": ggml type name, "shape": numpy shape, "sha256": of gguf.quants.dequantize's
    float32 values in C order, "first": the first 8 values}, for every tensor of the GGUF file
    (rope factors included)."""
    return json.loads((_gguf_reference(name) / "tensors.json").read_text())


# ---------------------------------------------------------------------------------------------
# Malformed GGUFs


def rewrite_gguf(src: Path, out: Path, kv: dict[str, str] | None = None,
                 tensors: dict[str, tuple[int, tuple[int, ...], bytes]] | None = None) -> Path:
    """A copy of `src` with string metadata `kv` set and tensors replaced by (ggml type, numpy
    shape, raw bytes) as given, written without gguf's checks (so shapes may lie)."""
    import gguf

    kv, tensors = kv or {}, tensors or {}
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.name in kv:
            writer.add_key_value(f.name, kv[f.name], gguf.GGUFValueType.STRING)
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    data = []
    for t in reader.tensors:
        if t.name in tensors:
            gtype, shape, raw = tensors[t.name]
            arr = np.frombuffer(raw, dtype=np.uint8)
            # a non-uint8 dtype makes the writer take `shape` as elements, not bytes
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), arr.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(gtype))
        else:
            arr = t.data
            writer.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, raw_dtype=t.tensor_type)
        data.append(arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for arr in data:
        writer.write_tensor_data(arr)
    writer.close()
    return out


UNKNOWN_PRE = "edgephi-test-unknown-pre"
GGML_TYPE_IQ4_NL = 20
BAD_K_TENSOR = "blk.0.attn_output.weight"  # 384 x 384: its rows are 1.5 blocks of 256


def _bad_unknown_pre(tmp: Path) -> Path:
    """Phi-4's Q4_K_M file naming a pre-tokenizer no one knows."""
    return rewrite_gguf(gguf_file("phi4-q4_k_m"), tmp / "unknown-pre.gguf", kv={"tokenizer.ggml.pre": UNKNOWN_PRE})


def _bad_iq4_nl(tmp: Path) -> Path:
    """Phi-4 as Q4_K_M with output.weight IQ4_NL, by llama.cpp's quantizer (--output-tensor-type)."""
    return quantize(gguf_file("phi4-f32"), tmp / "iq4_nl-output.gguf", "Q4_K_M", tmp / "quantize.log",
                    output_tensor_type=GGML_TYPE_IQ4_NL)


def _bad_k_rows(tmp: Path) -> Path:
    """The hidden-384 model's Q4_K_M file with BAD_K_TENSOR (Q5_0 there, as llama.cpp falls back)
    declared Q4_K: 384 x 384 values in 384 * 384 / 256 blocks of 144 bytes (the bytes of a real
    Q4_K tensor of the same file), so only the row length is wrong."""
    import gguf

    src = gguf_file("phi3.5-d384-q4_k_m")
    reader = gguf.GGUFReader(src)
    donor = next(t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_K
                 or t.tensor_type == gguf.GGMLQuantizationType.Q6_K)
    nbytes = 384 * 384 // 256 * 144
    raw = (bytes(donor.data.reshape(-1)) * 2)[:nbytes]
    assert len(raw) == nbytes
    return rewrite_gguf(src, tmp / "q4_k-rows-384.gguf",
                        tensors={BAD_K_TENSOR: (int(gguf.GGMLQuantizationType.Q4_K), (384, 384), raw)})


BAD_GGUFS = {"unknown-pre": _bad_unknown_pre, "iq4_nl-tensor": _bad_iq4_nl, "k-quant-rows-384": _bad_k_rows}
_BAD_SOURCES = {"unknown-pre": "phi4-q4_k_m", "iq4_nl-tensor": "phi4-f32", "k-quant-rows-384": "phi3.5-d384-q4_k_m"}


def bad_gguf(case: str) -> Path:
    """The malformed GGUF BAD_GGUFS[case] makes."""
    source = _BAD_SOURCES[case]
    key = _digest(BUILD_VERSION, case, _file_key(source), _versions("llama_cpp_python", "gguf"))
    folder = _cached(f"bad-{case}", key, lambda tmp: BAD_GGUFS[case](tmp))
    (path,) = folder.glob("*.gguf")
    return path


# ---------------------------------------------------------------------------------------------


def build_all() -> dict[str, Path]:
    """Every GGUF file, malformed file and reference result; returns the GGUF files by name."""
    out = {name: gguf_file(name) for name in GGUF_FILES}
    out.update({f"bad:{case}": bad_gguf(case) for case in BAD_GGUFS})
    for family in FAMILIES:
        hf_reference_logits(family)
    for name in GGUF_FILES:
        if GGUF_FILES[name][1] != "f32":
            gguf_reference_logits(name)
    return out


if __name__ == "__main__":
    import collections
    import time

    started = time.perf_counter()
    for name, path in build_all().items():
        try:
            counts = dict(sorted(collections.Counter(tensor_types(path).values()).items()))
            meta = metadata(path, "general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre")
        except ValueError as exc:  # gguf-py refuses some malformed files outright
            counts, meta = f"(gguf-py: {exc})", {}
        print(f"{name:22s} {path.stat().st_size / 1e6:7.1f} MB  {counts}  {meta}")
    print(f"{time.perf_counter() - started:.1f} s")
