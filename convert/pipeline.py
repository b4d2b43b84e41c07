"""Conversion: a source (HF folder or GGUF file) -> an edgephi model folder, tensor by tensor,
built in a temporary folder beside OUT and renamed into place only when complete."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgephi import format as fmt_
from edgephi import models
from edgephi.errors import EdgephiError
from edgephi.quant import FORMATS, QUANTIZABLE, QuantFormat, check_finite, dequantize, plane_key, plane_layout

from .calibrate import CALIBRATION_CHUNKS, CALIBRATION_CTX, ActivationStats, activation_stats, calibration_chunks
from .gguf_source import GGUFModel
from .hf_source import HFCheckpoint
from .imatrix import stats_from_imatrix, write_imatrix
from .quantize import can_quantize, importance_weights, quantize, quantize_weighted
from .recipes import DEFAULT_RECIPE, parse_recipe, recipe_format
from .safetensors_writer import SafetensorsWriter
from .staging import check_target, staged_folder
from .tensors import SourceTensor

CHUNK_ELEMENTS = 8 << 20  # rows quantized per step: bounds memory to a few hundred MB
LINEAR_KINDS = ("qkv", "o", "gate_up", "down")
EMBED_KINDS = ("embed", "output")
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>")


@dataclass
class TensorReport:
    name: str
    format: str
    shape: tuple[int, ...]
    source_format: str
    rel_error: float  # ||dequantized - source|| / ||source||; 0 when copied bit for bit
    lossless: bool
    _err2: float = 0.0
    _ref2: float = 0.0
    # calibrated: the same, weighted by each column's importance, for round-to-nearest and as written
    _rtn_werr2: float = 0.0
    _werr2: float = 0.0
    _wref2: float = 0.0


@dataclass
class Report:
    out: Path
    parameters: int = 0
    bytes_on_disk: int = 0
    seconds: float = 0.0
    tensors: list[TensorReport] = field(default_factory=list)

    calibration_tokens: int = 0
    importance_source: str = ""  # what the importance came from, for the report

    def weighted_by_kind(self) -> dict[str, tuple[float, float]]:
        """kind -> (round-to-nearest's, the written) importance-weighted relative error, for the
        kinds quantized by importance (calibrated conversions)."""
        groups: dict[str, list[TensorReport]] = {}
        for t in self.tensors:
            if t._wref2:
                groups.setdefault(t.name.rsplit(".", 1)[-1], []).append(t)
        return {kind: tuple((sum(getattr(t, a) for t in ts) / sum(t._wref2 for t in ts)) ** 0.5
                            for a in ("_rtn_werr2", "_werr2")) for kind, ts in groups.items()}

    def weighted_by_tensor(self) -> dict[str, tuple[float, float]]:
        """name -> (round-to-nearest's, the written) importance-weighted relative error, per tensor
        quantized by importance."""
        return {t.name: ((t._rtn_werr2 / t._wref2) ** 0.5, (t._werr2 / t._wref2) ** 0.5)
                for t in self.tensors if t._wref2}

    def by_kind(self) -> dict[str, tuple[str, float, bool]]:
        """kind -> (formats, error over all its tensors, all lossless)."""
        groups: dict[str, list[TensorReport]] = {}
        for t in self.tensors:
            groups.setdefault(t.name.rsplit(".", 1)[-1], []).append(t)
        out = {}
        for kind, ts in groups.items():
            ref2 = sum(t._ref2 for t in ts)
            err = (sum(t._err2 for t in ts) / ref2) ** 0.5 if ref2 else 0.0
            out[kind] = ("/".join(sorted({t.format for t in ts})), err, all(t.lossless for t in ts))
        return out


def open_source(src: Path):
    if not src.exists():
        raise EdgephiError(f"{src}: no such file or folder")
    if src.is_dir():
        return HFCheckpoint(src)
    if not src.is_file():  # a FIFO would block the read below forever, /dev/zero never end
        raise EdgephiError(f"{src}: not a regular file (nor a Hugging Face checkpoint folder)")
    if not GGUFModel.has_magic(src):  # opened non-blocking, refused if no longer a regular file
        raise EdgephiError(f"{src}: not a GGUF file or a Hugging Face checkpoint folder")
    return GGUFModel(src)


def target_format(t: SourceTensor, quant: str | None, embed_quant: str | None,
                  recipe: list[tuple[str, str]] | None = None) -> QuantFormat:
    kind = t.name.rsplit(".", 1)[-1]
    if kind not in LINEAR_KINDS + EMBED_KINDS:
        return FORMATS["f32"]  # norms stay float
    name = (recipe_format(recipe, t.name) if recipe else None) or (quant if kind in LINEAR_KINDS else embed_quant)
    if name is None:  # keep what the source holds (GGUF import)
        return t.stored_format or FORMATS["f16"]
    f = FORMATS[name]
    if not can_quantize(f, t.shape):
        raise EdgephiError(f"{t.origin}: {t.shape[1]} columns are not a multiple of 32, so it cannot be "
                           f"stored as {name}; choose f16 or f32")
    return f


def _generation(source, tokenizer, preset=None) -> dict:
    gen = source.generation(tokenizer.special_tokens)
    stops = [i for i in gen["eos_token_ids"] if isinstance(i, int)]
    gen["eos_token_id"] = stops[0] if stops else None  # the source's own eos, for templates' {{ eos_token }}
    stop_names = END_OF_TURN_TOKENS + (preset.stop_tokens if preset else ())
    stops += [tokenizer.special_tokens[t] for t in stop_names if t in tokenizer.special_tokens]
    if preset is not None:
        gen["chat_template"] = preset.chat_template
    gen["eos_token_ids"] = sorted(set(stops))
    return gen


def convert(src: str | Path, out: str | Path, *, quant: str | None = "q4_0", embed_quant: str | None = None,
            force: bool = False, preset: str | None = None, calibrate: str | Path | None = None,
            calibrate_chunks: int = CALIBRATION_CHUNKS, save_imatrix: str | Path | None = None,
            recipe: str | None = None, imatrix: str | Path | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> Report:
    """Convert `src` into the model folder `out`. quant/embed_quant None keeps a GGUF's own formats
    (a Hugging Face checkpoint then gets the preset's recommended quant, else q4_0). preset: a name
    from edgephi.models (presets.json) whose chat template and stop tokens go into generation.json.
    calibrate: a UTF-8 text file; the source model runs on it in float32, and q4_0/q4_1 blocks are
    then chosen by the importance of each input column (calibrate.py, quantize.quantize_weighted),
    from at most `calibrate_chunks` chunks of 512 tokens. save_imatrix: also write the statistics as
    llama.cpp's importance matrix (for `llama-quantize --imatrix`). recipe: per-tensor formats by name
    (recipes.py), over quant/embed_quant for the tensors its rules match. imatrix: take the importance
    from an importance-matrix file (llama-imatrix's, or --save-imatrix's) instead of a calibration run."""
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    for q in (quant, embed_quant):
        if q is not None and q not in QUANTIZABLE:
            raise EdgephiError(f"unknown quant format {q!r} (choose from {', '.join(QUANTIZABLE)})")
    check_target(out, force, src)
    if imatrix is not None and calibrate is not None:
        raise EdgephiError("give either a calibration text or an importance matrix, not both")
    if save_imatrix is not None and calibrate is None:
        raise EdgephiError("saving an importance matrix needs a calibration text (--calibrate)")
    text = _calibration_text(calibrate) if calibrate is not None else None
    if recipe is None and quant is None and (calibrate is not None or imatrix is not None):
        recipe = DEFAULT_RECIPE
    if isinstance(calibrate_chunks, bool) or not isinstance(calibrate_chunks, int) or calibrate_chunks < 1:
        raise EdgephiError(f"calibrate_chunks must be a positive integer, got {calibrate_chunks!r}")
    known = models.presets()
    if preset is not None and preset not in known:
        raise EdgephiError(f"unknown preset {preset!r} (known: {', '.join(known)})")
    preset_info = known.get(preset)
    source = open_source(src)
    if quant is None and isinstance(source, HFCheckpoint):
        quant = preset_info.recommended_quant if preset_info else "q4_0"
    if embed_quant is None and isinstance(source, HFCheckpoint):
        embed_quant = "q8_0"
    tokenizer = source.tokenizer()
    tensors = list(source.tensors())
    rules = parse_recipe(recipe, source.config.num_layers) if recipe is not None else None
    formats = {t.name: target_format(t, quant, embed_quant, rules) for t in tensors}
    matrices = _matrix_names(tensors)
    recipe = {t.name: {"format": formats[t.name].name, "shape": list(_logical_shape(t, matrices))}
              for t in tensors}
    config = replace(source.config, tensors=recipe,
                     source={"path": src.name, "kind": "gguf" if isinstance(source, GGUFModel) else "hf"})
    if tokenizer.n_vocab > config.vocab_size:
        raise EdgephiError(f"{src}: tokenizer has {tokenizer.n_vocab} ids but the embedding only "
                           f"{config.vocab_size} rows")
    # what the runtime will check at every load, checked before anything is written
    config.check(str(src)).check_recipe(str(src))
    tokenizer.check(str(src / "tokenizer.json" if src.is_dir() else src))
    generation = fmt_.check_generation(_generation(source, tokenizer, preset_info), f"{src} (generation settings)",
                                       config.vocab_size)

    report = Report(out)
    with staged_folder(out, check=lambda: check_target(out, force, src)) as tmp:
        tokenizer.save(tmp)
        stats = stats_from_imatrix(config, imatrix) if imatrix is not None else None
        if stats is not None:
            report.importance_source = str(imatrix)
        if text is not None:
            stats = _calibrate(config, tensors, text, calibrate_chunks, tmp, generation, progress, str(calibrate))
            report.calibration_tokens = stats.tokens
            report.importance_source = f"{stats.tokens} tokens of {Path(calibrate).name}"
            if save_imatrix is not None:
                write_imatrix(save_imatrix, config, stats, Path(calibrate).name, stats.tokens // CALIBRATION_CTX,
                              CALIBRATION_CTX)
        _write_weights(tmp / fmt_.WEIGHTS_FILE, tensors, formats, report, progress, str(src), stats)
        (tmp / fmt_.CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=1) + "\n")
        (tmp / fmt_.GENERATION_FILE).write_text(json.dumps(generation, indent=1) + "\n")
    report.bytes_on_disk = sum(p.stat().st_size for p in out.iterdir())
    report.seconds = time.perf_counter() - started
    return report


def _calibration_text(path) -> str:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgephiError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise EdgephiError(f"{path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise EdgephiError(f"{path}: the calibration text is empty")
    return text


def _calibrate(config, tensors: list[SourceTensor], text: str, chunks: int, folder: Path, generation: dict,
               progress, where: str) -> ActivationStats:
    """The linear layers' input statistics on `text`, tokenized by the tokenizer just written to `folder`."""
    from edgephi.tokenizer import Tokenizer

    ids = Tokenizer.from_folder(folder).encode(text)
    bos = generation.get("bos_token_id") if generation.get("add_bos_token") else None
    if len(ids) < 64:
        raise EdgephiError(f"{where}: the calibration text is only {len(ids)} tokens; give it at least 64")
    return activation_stats(config, {t.name: t for t in tensors}, calibration_chunks(ids, bos, chunks=chunks),
                            progress)


def _matrix_names(tensors: list[SourceTensor]) -> set[str]:
    return {t.name for t in tensors if t.name.rsplit(".", 1)[-1] in LINEAR_KINDS + EMBED_KINDS}


def _logical_shape(t: SourceTensor, matrices: set[str]) -> tuple[int, ...]:
    return t.shape if t.name in matrices else (t.shape[1],)


def _write_weights(path: Path, tensors: list[SourceTensor], formats: dict[str, QuantFormat], report: Report,
                   progress, where: str, stats: ActivationStats | None = None) -> None:
    matrices = _matrix_names(tensors)
    entries = []
    for t in tensors:
        for plane, (dtype, shape) in plane_layout(formats[t.name], _logical_shape(t, matrices)).items():
            entries.append((plane_key(t.name, plane), dtype, shape))
    writer = SafetensorsWriter(path, entries, {"format": fmt_.FORMAT_NAME,
                                               "format_version": str(fmt_.FORMAT_VERSION)})
    total = sum(int(np.prod(t.shape)) for t in tensors)
    done = 0
    try:
        for t in tensors:
            f = formats[t.name]
            stored = t.stored_format
            rep = TensorReport(t.name, f.name, _logical_shape(t, matrices), stored.name if stored else "float",
                               0.0, lossless=stored is not None and stored.name == f.name and not f.is_float)
            rows, cols = t.shape
            step = max(1, CHUNK_ELEMENTS // cols)
            importance = stats.importance(t.name) if stats is not None and f.name in ("q4_0", "q4_1") else None
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                if rep.lossless:
                    planes = t.planes(start, stop)
                else:
                    ref = t.floats(start, stop)
                    if not np.isfinite(ref).all():
                        row = start + int(np.nonzero(~np.isfinite(ref).all(axis=-1))[0][0])
                        raise EdgephiError(f"{where}: tensor {t.origin} holds NaN or Inf (row {row})")
                    planes = quantize(ref, f) if importance is None else quantize_weighted(ref, f, importance)
                    back = dequantize(planes, f).astype(np.float64)
                    rep._err2 += float(np.sum((back - ref) ** 2))
                    rep._ref2 += float(np.sum(ref.astype(np.float64) ** 2))
                    if importance is not None:
                        w = importance_weights(ref, importance).reshape(ref.shape)
                        rtn = dequantize(quantize(ref, f), f)
                        rep._rtn_werr2 += float(np.sum(w * (rtn - ref) ** 2, dtype=np.float64))
                        rep._werr2 += float(np.sum(w * (back - ref) ** 2, dtype=np.float64))
                        rep._wref2 += float(np.sum(w * ref * ref, dtype=np.float64))
                # a finite source can still overflow float16 scales (a block whose largest value is 1e7)
                check_finite(where, t.origin, planes)
                for plane, arr in planes.items():
                    if t.name not in matrices:
                        arr = arr.reshape(-1)
                    writer.write(plane_key(t.name, plane), arr, start)
                done += (stop - start) * cols
                if progress:
                    progress(done, total, t.name)
            rep.rel_error = (rep._err2 / rep._ref2) ** 0.5 if rep._ref2 else 0.0
            # a quantized or float source kept in (or widened to) a float format loses nothing
            rep.lossless = rep.lossless or (stored is not None and f.is_float and rep._err2 == 0.0)
            report.tensors.append(rep)
            report.parameters += rows * cols
    except BaseException:
        writer.abort()
        raise
    writer.close()
