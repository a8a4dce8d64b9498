"""``edgeft export gguf``: a merged checkpoint to llama.cpp files, with proof they match it.

One full-precision GGUF is converted from the safetensors (F32 unless only F16/BF16 files are
asked for), the quantized types are made from it by llama.cpp's own quantizer, and then every
file is loaded in llama.cpp and measured against the checkpoint in PyTorch on the same token
ids: tokenizer identity on a corpus, logits, perplexity and greedy generation. Full-precision
files that miss the tolerance fail the export; quantized files are reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgeft import __version__
from edgeft._io import atomic_dir, sha256_file
from edgeft.architectures import uniform_context
from edgeft.errors import EdgeftError, ModelError, ParityError
from edgeft.export import parse_types as _parse_types
from edgeft.export.gguf.convert import OUT_TYPES, convert_checkpoint, read_model_spec
from edgeft.export.gguf.imatrix import Imatrix, collect, read_imatrix, write_imatrix
from edgeft.export.gguf.quantize import (
    IGNORES_IMATRIX,
    NEEDS_IMATRIX,
    QUANTIZED_TYPES,
    check_finite,
    quantize,
)
from edgeft.export.gguf.vocab import check_token_ids, corpus_for, read_vocab
from edgeft.fidelity import (
    F16_KV_NOISE,
    GREEDY_PROMPT,
    Measurement,
    Reference,
    default_eval_text,
    measure,
)
from edgeft.hfcompat import chat_ids
from edgeft.isolate import in_child, peak_rss_mb
from edgeft.models import weights_sha256
from edgeft.options import DEFAULT_THREADS
from edgeft.parity import Parity, first_divergence
from edgeft.provenance import (
    BaseRecord,
    MergeRecord,
    StageRecord,
    find_record,
    make_record,
    write_record,
)
from edgeft.runtimes import get_runtime
from edgeft.runtimes.llamacpp import MAX_DEFAULT_CTX

logger = logging.getLogger(__name__)

GGUF_TYPES = (*OUT_TYPES, *QUANTIZED_TYPES)

# Full-precision files must match the checkpoint: mean KL(reference || GGUF) in nats and top-1
# agreement. F32 differs only by kernel summation order (measured ~1e-9 on SmolLM2-135M); F16
# rounds weights to 11 mantissa bits (measured 4e-6); BF16 to 8.
FULL_PRECISION_TOLERANCE = {"f32": (1e-4, 0.99), "f16": (5e-3, 0.95), "bf16": (2e-2, 0.90)}


@dataclass
class FileReport:
    """One written GGUF file and how it compares with the checkpoint."""

    file: str
    type: str
    bytes: int
    sha256: str
    seconds: float
    parity: Parity
    perplexity: float
    greedy_first_divergence: int | None
    top1_off_ties: float  # the gate's top-1: near-ties within F16 KV rounding agree
    gated: bool
    tensor_types: dict[str, int] = field(default_factory=dict)
    # llama.cpp's process measuring this file: what running it at the eval context costs
    runtime_peak_rss_mb: float | None = None

    def as_dict(self) -> dict:
        return {**self.__dict__, "parity": self.parity.as_dict()}


@dataclass
class GGUFExport:
    """What ``export_gguf`` wrote and measured."""

    out: Path
    files: list[FileReport]
    reference_perplexity: float
    eval_tokens: int
    tokenizer: dict
    notes: list[str] = field(default_factory=list)
    imatrix: dict | None = None  # what the quantized files were made with (edgeft.json's)


def parse_types(spec: str | Sequence[str]) -> list[str]:
    """``"f16,q8_0"`` → the GGUF types named, checked and de-duplicated."""
    return _parse_types(spec, GGUF_TYPES, "GGUF")


def _provenance_metadata(
    model_dir: Path, source_sha256: str
) -> tuple[dict[str, str], StageRecord | None]:
    """``edgeft.*`` GGUF keys from the checkpoint's own ``edgeft.json`` (if edgeft wrote it)."""
    record = find_record(model_dir)
    keys = {"edgeft.version": __version__, "edgeft.source.sha256": source_sha256}
    if isinstance(record, MergeRecord):
        keys["edgeft.source.base_model"] = Path(record.inputs.base.name).name
        keys["edgeft.source.base_sha256"] = record.inputs.base.weights_sha256
        keys["edgeft.adapter.sha256"] = record.inputs.adapter.sha256
        keys["edgeft.merge_base"] = record.settings.merge_base
    return {k: v for k, v in keys.items() if v}, record


def _origin_notes(record: StageRecord | None) -> list[str]:
    """A warning when the weights were themselves rebuilt from a quantized file (the embedded
    default model is dequantized from a Q4_1 GGUF), directly or as the base of a merge."""
    origin = record
    if isinstance(record, MergeRecord):
        origin = find_record(Path(record.inputs.base.path))
    if isinstance(origin, BaseRecord):
        return [
            "the base weights were dequantized from a 4-bit GGUF, so quantized files re-round "
            "values that were already on a 4-bit grid"
        ]
    return []


def _check_tokenizer(model_dir: Path, gguf_path: Path, vocab, threads: int) -> dict:
    """Token ids and chat-template ids of llama.cpp vs Hugging Face; a mismatch is an error."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    chat_texts = []
    conversation = [
        {"role": "system", "content": "You are a helpful cooking assistant."},
        {"role": "user", "content": "How long do I boil an egg?"},
        {"role": "assistant", "content": "About ten minutes for a hard-boiled egg."},
    ]
    if hf.chat_template:
        chat_texts.append(hf.apply_chat_template(conversation, tokenize=False))
    check = check_token_ids(hf, gguf_path, corpus_for(vocab, chat_texts))
    result = check.as_dict()
    if hf.chat_template:
        session = get_runtime("llama.cpp").load(gguf_path, threads=threads, vocab_only=True)
        try:
            expected = chat_ids(hf, [{"role": "user", "content": GREEDY_PROMPT}])
            got = session.tokenize(GREEDY_PROMPT, chat=True)
        finally:
            session.close()
        result["chat_template_identical"] = expected == got
        if expected != got:
            at = first_divergence(expected, got)
            check.mismatches.append(
                {
                    "text": "chat template",
                    "first_difference": at,
                    "hugging_face": expected[at : at + 5],
                    "llama_cpp": got[at : at + 5],
                }
            )
    if check.mismatches:
        first = check.mismatches[0]
        raise ModelError(
            f"{gguf_path.name}: llama.cpp tokenizes differently from the Hugging Face tokenizer "
            f"of {model_dir} on {len(check.mismatches)} of {check.texts} texts (first: "
            f"{first['text']!r} at token {first['first_difference']}: Hugging Face "
            f"{first['hugging_face']} vs llama.cpp {first['llama_cpp']}); nothing was written"
        )
    return result


def _k_quant_fallbacks(path: Path, quant: str) -> tuple[dict[str, int], str | None]:
    """Tensor-type counts of a written file, and a note when llama.cpp had to use a non-k type
    for some weights of a k-quant file (it does so when a row is not a multiple of 256)."""
    from edgeft.gguf_file import read_gguf

    info = read_gguf(path)
    counts = info.tensor_type_counts()
    if not quant.endswith(("_k", "_k_m")):
        return counts, None
    weights = [t for t in info.tensors if len(t.shape) >= 2]
    fallback = [t for t in weights if not t.type.endswith("_k")]
    if not fallback:
        return counts, None
    rows = sorted({t.shape[0] for t in fallback})
    kinds = sorted({t.type for t in fallback})
    return counts, (
        f"{path.name}: {len(fallback)} of {len(weights)} weight tensors are "
        f"{'/'.join(kinds)}, not k-quants: llama.cpp falls back when a row "
        f"({', '.join(map(str, rows))}) is not a multiple of 256"
    )


def _measured_report(
    path: Path, out_type: str, reference: Reference, threads: int, seconds: float, *, gated: bool
) -> tuple[FileReport, str | None]:
    """Measure one written file; return its report and a k-quant fallback note, if any."""
    result, runtime_rss = in_child(
        measure_file, path, reference, threads, what=f"measuring {path.name} in llama.cpp"
    )
    tensor_types, fallback = _k_quant_fallbacks(path, out_type)
    report = FileReport(
        file=path.name,
        type=out_type,
        bytes=path.stat().st_size,
        sha256=sha256_file(path),
        seconds=round(seconds, 3),
        parity=result.parity,
        perplexity=result.perplexity,
        greedy_first_divergence=result.greedy_first_divergence,
        top1_off_ties=result.top1_off_ties,
        gated=gated,
        tensor_types=tensor_types,
        runtime_peak_rss_mb=runtime_rss,
    )
    return report, fallback


def measure_file(
    path: Path, reference: Reference, threads: int, lora_path: Path | None = None
) -> Measurement:
    """Parity, perplexity and greedy divergence of one GGUF against the reference; near-ties
    within llama.cpp's F16 KV rounding count as top-1 agreement in ``top1_off_ties``."""
    greedy = len(reference.prompt_ids) + len(reference.greedy)
    n_ctx = max(len(reference.eval_ids), greedy, 128) + 64
    if reference.context_length:  # LongRoPE: within its original context (uniform_context)
        n_ctx = min(n_ctx, reference.context_length)
    session = get_runtime("llama.cpp").load(path, threads=threads, lora_path=lora_path, n_ctx=n_ctx)
    try:
        return measure(session, reference, noise=F16_KV_NOISE)
    finally:
        session.close()


def export_gguf(
    model: Path,
    out: Path,
    types: str | Sequence[str] = ("f16", "q8_0", "q4_k_m"),
    *,
    eval_text: str | None = None,
    threads: int = DEFAULT_THREADS,
    force: bool = False,
    allow_requantize: bool = False,
    imatrix: str | Path | None = None,
    calibration: Path | None = None,
    progress=None,
) -> GGUFExport:
    """Convert a Hugging Face checkpoint to GGUF files and measure each against it.

    Args:
        model: a full-precision checkpoint directory (``edgeft merge`` output or any supported
            Hugging Face checkpoint with safetensors weights and a tokenizer.json), or a GGUF
            file to quantize (measured against that file in llama.cpp).
        out: output directory: ``model-<type>.gguf`` files and ``edgeft.json``.
        types: GGUF types (:data:`GGUF_TYPES`).
        eval_text: text for logits parity and perplexity (default: a shipped cooking text).
        allow_requantize: quantize a GGUF source that is itself quantized (each rounding
            adds error; off by default).
        imatrix: the importance matrix the quantized types are made with: ``"auto"``
            computes it from ``calibration``, else the fine-tuning data named in the
            checkpoint's provenance, else text sampled from the checkpoint; ``"none"``; or an
            imatrix file (llama.cpp's GGUF or ``.dat`` format). Default: ``"auto"`` when
            ``calibration`` or the fine-tuning data is there, else ``"none"``. A computed one
            is written beside the files as ``imatrix.gguf``.
        calibration: text or JSONL the importance matrix is computed from.
        progress: optional callable ``(message: str) -> None`` for stage messages.

    Raises:
        ModelError: unsupported architecture or tokenizer, or llama.cpp tokenizes differently.
        ParityError: a full-precision file differs from the checkpoint beyond tolerance.
        EdgeftError: a type that needs an importance matrix without one.
    """
    say = progress or (lambda message: logger.info(message))
    model, out = Path(model), Path(out)
    types = parse_types(types)
    if model.is_file():
        return _requantize(
            model,
            out,
            types,
            eval_text=eval_text,
            threads=threads,
            force=force,
            allow_requantize=allow_requantize,
            imatrix=imatrix,
            say=say,
        )
    spec = read_model_spec(model)
    vocab = read_vocab(model, spec.n_vocab)
    source_sha256 = weights_sha256(model)
    metadata, record = _provenance_metadata(model, source_sha256)
    name = model.name
    if isinstance(record, MergeRecord):
        name = f"{Path(record.inputs.base.name).name}-finetuned"

    full = [t for t in types if t in OUT_TYPES]
    quantized = [t for t in types if t in QUANTIZED_TYPES]
    texts, dataset, given = _importance_source(model, imatrix, calibration, quantized)
    with atomic_dir(out, force) as work:
        timings: dict[str, float] = {}
        # The quantizer reads the most precise file there is; one that holds every weight
        # exactly (the checkpoint's own 16-bit type, else F32) is made for it if needed.
        source_type = _lossless_type(model) if quantized or not full else full[0]
        if quantized and source_type not in full and "f32" in full:
            source_type = "f32"
        for out_type in dict.fromkeys([source_type, *full]):
            start = time.perf_counter()
            say(f"converting {model} to {out_type.upper()}")
            convert_checkpoint(
                model,
                work / f"model-{out_type}.gguf",
                out_type,
                name=name,
                metadata=metadata,
                vocab=vocab,
                progress=progress is not None,
            )
            timings[out_type] = time.perf_counter() - start
        source = work / f"model-{source_type}.gguf"
        importance, used = None, None
        if texts is not None:
            start = time.perf_counter()
            say(f"computing the importance matrix on {dataset}")
            importance = collect(model, texts, datasets=[dataset])
            write_imatrix(importance, work / IMATRIX_FILE)
            timings["imatrix"] = time.perf_counter() - start
            used = _imatrix_record(importance, work / IMATRIX_FILE, dataset, computed=True)
        elif given is not None:
            importance = given
            used = _imatrix_record(importance, Path(imatrix), dataset, computed=False)
        for quant in quantized:
            start = time.perf_counter()
            say(f"quantizing to {quant.upper()} with llama.cpp")
            quantize(
                source,
                work / f"model-{quant}.gguf",
                quant,
                threads=threads,
                imatrix=importance,
                metadata=_imatrix_metadata(used, quant),
            )
            timings[quant] = time.perf_counter() - start

        say("checking llama.cpp's token ids against the Hugging Face tokenizer")
        # in a process of its own: llama.cpp keeps what it allocates
        tokenizer, _ = in_child(
            _check_tokenizer, model, source, vocab, threads, what="checking llama.cpp's tokenizer"
        )
        say("measuring every file against the checkpoint in PyTorch")
        reference = Reference(
            get_runtime("torch").load(model, threads=threads),
            eval_text or default_eval_text(),
            uniform_context(spec.config),
        )
        reports = []
        notes = [*spec.notes, *vocab.notes, *_origin_notes(record)]
        for out_type in types:
            path = work / f"model-{out_type}.gguf"
            report, fallback = _measured_report(
                path,
                out_type,
                reference,
                threads,
                timings[out_type],
                gated=out_type in FULL_PRECISION_TOLERANCE,
            )
            notes += [fallback] if fallback else []
            reports.append(report)
            parity, ppl, gated = report.parity, report.perplexity, report.gated
            say(
                f"{path.name}: {parity.summary()}, perplexity {ppl:.3f} "
                f"(checkpoint {reference.perplexity:.3f})"
            )
            if gated:
                max_kl, min_top1 = FULL_PRECISION_TOLERANCE[out_type]
                if not (parity.mean_kl <= max_kl and report.top1_off_ties >= min_top1):
                    raise ParityError(
                        f"{path.name} differs from {model}: {parity.summary()}, "
                        f"{report.top1_off_ties:.2%} off near-ties (tolerance for {out_type}: "
                        f"mean KL ≤ {max_kl}, top-1 off near-ties ≥ {min_top1:.0%}); the "
                        "converter lost something, nothing was written"
                    )
        if source_type not in types:
            source.unlink()
        write_record(
            work,
            make_record(
                "export-gguf",
                inputs={
                    "model": {
                        "path": model.resolve(),
                        "weights_sha256": source_sha256,
                        "architecture": spec.hf_architecture,
                    },
                    "source_record": record.model_dump(
                        mode="json", include={"stage", "inputs", "settings"}
                    )
                    if record
                    else None,
                },
                settings={
                    "types": types,
                    "threads": threads,
                    "quantized_from": source_type,
                    "eval_tokens": len(reference.eval_ids),
                    "greedy_prompt": GREEDY_PROMPT,
                    "greedy_tokens": reference.greedy_tokens,
                    "tolerance": FULL_PRECISION_TOLERANCE,
                    "gguf_metadata": metadata,
                    "imatrix": used,
                },
                results={
                    "reference": "the checkpoint in PyTorch fp32",
                    "reference_perplexity": reference.perplexity,
                    "tokenizer": {"model": vocab.model, "pre": vocab.pre, **tokenizer},
                    "files": [r.as_dict() for r in reports],
                    "notes": notes,
                    # this process's own; each file's llama.cpp process: runtime_peak_rss_mb
                    "peak_rss_mb": peak_rss_mb(),
                },
            ),
        )
    return GGUFExport(
        out=out,
        files=reports,
        reference_perplexity=reference.perplexity,
        eval_tokens=len(reference.eval_ids),
        tokenizer=tokenizer,
        notes=notes,
        imatrix=used,
    )


IMATRIX_FILE = "imatrix.gguf"


def _importance_source(
    model: Path, imatrix: str | Path | None, calibration: Path | None, quantized: list[str]
) -> tuple[list[str] | None, str | None, Imatrix | None]:
    """Where the importance matrix comes from: ``(texts to compute it on, their source,
    None)``, ``(None, the file's datasets, the matrix read from it)``, or no matrix.

    Raises:
        EdgeftError: an imatrix file that is not there or not one; a type that needs a matrix
            without one.
    """
    from edgeft.calibration import calibration_texts, fine_tuning_data

    mode = str(imatrix) if imatrix is not None else None
    if not [q for q in quantized if q not in IGNORES_IMATRIX]:
        mode = "none"
    if mode in (None, "auto"):  # the data is looked up (and hashed) once
        calibration = calibration or fine_tuning_data(model)
        mode = mode or ("auto" if calibration is not None else "none")
    texts, dataset, given = None, None, None
    if mode == "auto":
        texts, dataset = calibration_texts(model, calibration)
    elif mode != "none":
        given, dataset = _read_given(Path(mode))
    _check_needs(quantized, texts is not None or given is not None)
    return texts, dataset, given


def _read_given(path: Path) -> tuple[Imatrix, str]:
    if not path.is_file():
        raise EdgeftError(f"--imatrix {path}: no such file; pass auto, none or an imatrix file")
    given = read_imatrix(path)
    return given, ", ".join(given.datasets) or path.name


def _check_needs(quantized: list[str], have: bool) -> None:
    needs = [q for q in quantized if q in NEEDS_IMATRIX]
    if needs and not have:
        raise EdgeftError(
            f"{', '.join(needs)} need an importance matrix: pass --imatrix auto (computed from "
            "--calibration, the fine-tuning data or text sampled from the model) or --imatrix "
            "FILE (from llama-imatrix or an earlier export)"
        )


def _imatrix_record(importance: Imatrix, path: Path, dataset: str, *, computed: bool) -> dict:
    """What ``edgeft.json`` says of the importance matrix the quantized files were made with."""
    return {
        "file": path.name if computed else str(path.resolve()),
        "sha256": sha256_file(path),
        "source": dataset,
        "computed": computed,
        "entries": len(importance.sums),
        "chunks": importance.chunks,
        "tokens": max(importance.counts.values(), default=0),
    }


def _imatrix_metadata(used: dict | None, quant: str) -> dict[str, str | int] | None:
    """GGUF keys of a ``quant`` file quantized with the importance matrix ``used``:
    llama-quantize's own, and the matrix's sha256; none where there is no matrix or the type
    ignores it."""
    if used is None or quant in IGNORES_IMATRIX:
        return None
    source = used["source"]
    return {
        "quantize.imatrix.file": Path(used["file"]).name,
        "quantize.imatrix.dataset": Path(source).name if "/" in source else source,
        "quantize.imatrix.entries_count": used["entries"],
        "quantize.imatrix.chunks_count": used["chunks"],
        "edgeft.imatrix.sha256": used["sha256"],
    }


def _lossless_type(model_dir: Path) -> str:
    """The smallest GGUF type that holds every matrix of ``model_dir`` exactly: ``bf16`` or
    ``f16`` when all are stored so (half the disk and time of F32 on big models), else ``f32``."""
    from edgeft.weights import safetensors_index

    stored = {t.dtype for t in safetensors_index(model_dir).values() if len(t.shape) >= 2}
    return {frozenset({"BF16"}): "bf16", frozenset({"F16"}): "f16"}.get(frozenset(stored), "f32")


def _requantize(
    source: Path,
    out: Path,
    types: list[str],
    *,
    eval_text,
    threads,
    force,
    allow_requantize,
    imatrix,
    say,
) -> GGUFExport:
    """Quantize a GGUF file with llama.cpp and measure each result against the file itself."""
    from edgeft.gguf_file import FULL_PRECISION_FILE_TYPES, file_type_name, gguf_metadata

    meta = gguf_metadata(source)
    full = [t for t in types if t not in QUANTIZED_TYPES]
    if full:
        raise EdgeftError(
            f"{source} is already a GGUF file: only quantized types can be made from it, not "
            f"{', '.join(full)}; convert the Hugging Face checkpoint for those"
        )
    source_type = file_type_name(meta)
    if meta.get("general.file_type") not in FULL_PRECISION_FILE_TYPES and not allow_requantize:
        raise EdgeftError(
            f"{source} is already quantized ({source_type}); quantizing it again compounds the "
            "rounding error: export from the full-precision checkpoint, or pass "
            "--allow-requantize"
        )
    check_finite(source)  # a NaN in the source would only be rounded into every output
    given, used = None, None
    if imatrix is not None and str(imatrix) == "auto":
        raise EdgeftError(
            f"--imatrix auto computes the importance matrix from the Hugging Face checkpoint; "
            f"{source} is a GGUF file: pass the checkpoint as --model, or --imatrix FILE"
        )
    if imatrix is not None and str(imatrix) != "none":
        given, dataset = _read_given(Path(imatrix))
        used = _imatrix_record(given, Path(imatrix), dataset, computed=False)
    _check_needs(types, given is not None)
    with atomic_dir(out, force) as work:
        timings = {}
        for quant in types:
            start = time.perf_counter()
            say(f"quantizing {source.name} to {quant.upper()} with llama.cpp")
            quantize(
                source,
                work / f"model-{quant}.gguf",
                quant,
                threads=threads,
                allow_requantize=allow_requantize,
                imatrix=given,
                metadata=_imatrix_metadata(used, quant),
            )
            timings[quant] = time.perf_counter() - start
        say(f"measuring every file against {source.name} in llama.cpp")
        arch = meta.get("general.architecture")
        context = meta.get(f"{arch}.rope.scaling.original_context_length") or meta.get(
            f"{arch}.context_length"
        )
        reference = Reference(
            get_runtime("llama.cpp").load(
                source, threads=threads, n_ctx=min(context, MAX_DEFAULT_CTX) if context else None
            ),
            eval_text or default_eval_text(),
            context,
        )
        reports = []
        notes = [f"quantized from a {source_type} GGUF; measured against that file"]
        if source_type not in FULL_PRECISION_FILE_TYPES.values():
            notes.append("the source was already quantized (--allow-requantize)")
        for quant in types:
            path = work / f"model-{quant}.gguf"
            report, fallback = _measured_report(
                path, quant, reference, threads, timings[quant], gated=False
            )
            notes += [fallback] if fallback else []
            reports.append(report)
        write_record(
            work,
            make_record(
                "export-gguf",
                inputs={
                    "model": {
                        "path": source.resolve(),
                        "sha256": sha256_file(source),
                        "file_type": source_type,
                    }
                },
                settings={
                    "types": types,
                    "threads": threads,
                    "allow_requantize": allow_requantize,
                    "eval_tokens": len(reference.eval_ids),
                    "imatrix": used,
                },
                results={
                    "reference": f"the source GGUF ({source_type}) in llama.cpp",
                    "reference_perplexity": reference.perplexity,
                    "files": [r.as_dict() for r in reports],
                    "notes": notes,
                    # this process's own; each file's llama.cpp process: runtime_peak_rss_mb
                    "peak_rss_mb": peak_rss_mb(),
                },
            ),
        )
    return GGUFExport(
        out=out,
        files=reports,
        reference_perplexity=reference.perplexity,
        eval_tokens=len(reference.eval_ids),
        tokenizer={},
        notes=notes,
        imatrix=used,
    )
