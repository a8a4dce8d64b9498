"""``edgeft export onnx``: a merged checkpoint to ONNX folders with a KV cache, proven to run
in onnxruntime and onnxruntime-genai and measured against the checkpoint.

The fused graph (:mod:`edgeft.export.onnx.graph`) is written from the safetensors one tensor
at a time, its weights appended to ``model.onnx.data`` as they are made: fp32 as stored, int8
and int4 quantized on the way (:mod:`edgeft.export.onnx.nbits`, GPTQ layer by layer). fp16,
int8-dynamic and optimum-onnx's trace (``--graph optimum``) are passes over a whole fp32 graph
(:mod:`edgeft.export.onnx.quantize`). Each precision gets its own folder, complete for an app:
``model.onnx`` + ``model.onnx.data``, tokenizer, config and ``genai_config.json``, optionally
``model.ort`` with its operator list. The fp32 folder must match PyTorch within a stated
tolerance, or the export fails; the others are measured and reported.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgeft._io import atomic_dir, sha256_file
from edgeft.architectures import architecture_of, supported
from edgeft.calibration import SAMPLED, calibration_texts
from edgeft.errors import EdgeftError, ModelError, ParityError
from edgeft.export import parse_types as _parse_types
from edgeft.export.onnx.lora import (
    ADAPTERS_DIR,
    lora_modules,
    mark_base,
    read_adapters,
    write_adapter,
)
from edgeft.export.onnx.quantize import (
    ONNX_TYPES,
    QuantSettings,
    bits_plan,
    dynamic_int8,
    fold_transposed_weights,
    graphs,
    pack_qkv,
    quantize_embeddings,
    quantize_weights,
    set_kv_cache,
    to_fp16,
)
from edgeft.fidelity import Reference, default_eval_text, measure
from edgeft.formats import ONNX_ADAPTER_SUFFIX, ONNX_MODEL_FILE, check_external_data
from edgeft.hfcompat import chat_ids, model_config
from edgeft.isolate import free_memory, in_child, peak_rss_mb
from edgeft.models import read_export_config, weights_sha256
from edgeft.options import DEFAULT_THREADS
from edgeft.parity import Parity, first_divergence
from edgeft.provenance import make_record, write_record
from edgeft.runtimes import get_runtime
from edgeft.runtimes.llamacpp import MAX_DEFAULT_CTX
from edgeft.session import generate
from edgeft.streaming import CALIBRATION_RESIDENT_SHARE, should_stream

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = supported()
# fp32 ONNX vs PyTorch fp32: both compute in fp32, so only kernel summation order differs
# (measured on SmolLM2-135M: max |Δlogit| 7e-5, mean KL 1e-11).
FP32_MAX_ABS_DIFF = 1e-2
FP32_MAX_KL = 1e-5
# fp16 weights and compute: reported against these, and failed only beyond them.
FP16_MAX_KL = 5e-3
MODEL_FILE = ONNX_MODEL_FILE
DATA_FILE = "model.onnx.data"
# Graphs above this size keep their weights in DATA_FILE, every tensor of EXTERNAL_MIN_BYTES or
# more. Protobuf cannot hold 2 GiB, and onnxruntime loads external weights tensor by tensor
# instead of parsing them out of one buffer, which holds less memory after loading
# (benchmarks/README.md#onnx-int4-memory-at-the-same-context-as-llamacpp-cpu-2-threads). So
# every folder has its data file.
EXTERNAL_DATA_BYTES = 0
EXTERNAL_MIN_BYTES = 1024
# Files an app needs beside the graph, copied from the optimum export.
COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclass
class FolderReport:
    """One written ONNX folder and how it compares with the checkpoint."""

    folder: str
    type: str
    bytes: int
    files: dict[str, str]  # name → sha256
    seconds: float
    parity: Parity
    perplexity: float
    greedy_first_divergence: int | None
    genai_greedy_identical: bool
    gated: bool
    ops: dict[str, int] = field(default_factory=dict)
    # the peak RSS of the process that ran it in onnxruntime, then onnxruntime-genai
    runtime_peak_rss_mb: float | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "parity": self.parity.as_dict()}


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote and measured."""

    out: Path
    folders: list[FolderReport]
    reference_perplexity: float
    eval_tokens: int
    settings: QuantSettings
    notes: list[str] = field(default_factory=list)
    adapters: list[AdapterReport] = field(default_factory=list)


@dataclass
class AdapterReport:
    """One ``.onnx_adapter`` file written beside the base folders, and base + adapter in each
    folder against the adapter over the full-precision base in PyTorch."""

    name: str
    file: str  # relative to the export folder
    sha256: str
    bytes: int
    modules: int
    rank: int
    base_weights_sha256: str
    reference_perplexity: float
    folders: list[FolderReport]

    def as_dict(self) -> dict:
        return {**asdict(self), "folders": [f.as_dict() for f in self.folders]}


def parse_types(spec: str | Sequence[str]) -> list[str]:
    """``"fp32,int4"`` → the ONNX types named, checked and de-duplicated."""
    return _parse_types(spec, ONNX_TYPES, "ONNX")


def _optimum_export(model: Path, folder: Path) -> None:
    """The fp32 decoder with KV cache, through optimum-onnx (PyTorch trace, no validation:
    edgeft validates against PyTorch itself, and fails instead of warning)."""
    import warnings

    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            str(model),
            output=str(folder),
            task="text-generation-with-past",
            device="cpu",
            do_validation=False,
            trust_remote_code=False,
        )
    for stray in folder.glob("*.onnx_data"):  # optimum's own external-data name
        stray.unlink()
    if not (folder / MODEL_FILE).is_file():
        raise ModelError(f"optimum-onnx wrote no {MODEL_FILE} for {model}")


def _load(folder: Path):
    import onnx

    return onnx.load(str(folder / MODEL_FILE))


def _save(model, folder: Path) -> None:
    """Save a graph with every path inside ``folder`` (external data only when large)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    # The weights' bytes, counted without serializing: protobuf cannot serialize (nor measure)
    # a message over 2 GiB.
    graph = getattr(model, "graph", None)
    weights = (
        sum(len(i.raw_data) or i.ByteSize() for g in graphs(graph) for i in g.initializer)
        if hasattr(graph, "initializer")
        else EXTERNAL_DATA_BYTES + 1
    )
    onnx.save_model(
        model,
        str(folder / MODEL_FILE),
        save_as_external_data=weights > EXTERNAL_DATA_BYTES,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=EXTERNAL_MIN_BYTES,
    )


def check_finite_initializers(model, where: Path) -> None:
    """Raise unless every float initializer of an in-memory graph is finite.

    Raises:
        ModelError: an initializer holds NaN or inf (named, with the folder it was made for).
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    for tensor in model.graph.initializer:
        # external tensors were checked as they were written (graph.ExternalData)
        if tensor.data_type not in floats or tensor.data_location == TensorProto.EXTERNAL:
            continue
        values = numpy_helper.to_array(tensor).astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise ModelError(
                f"{where}: tensor {tensor.name} has non-finite values (NaN or inf) after "
                f"conversion to {where.name}; nothing was written"
            )


def _companions(source: Path, folder: Path) -> None:
    for name in COMPANION_FILES:
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)


def _op_counts(folder: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in (
            "MatMul",
            "MatMulNBits",
            "MatMulInteger",
            "Gather",
            "GatherBlockQuantized",
            "DynamicQuantizeMatMul",
        ):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


GRAPHS = ("fused", "optimum")


def _export_fp32(model: Path, folder: Path, graph: str, lora=None) -> None:
    """The fp32 decoder: edgeft's fused graph, or optimum-onnx's trace."""
    if graph == "optimum":
        from edgeft.weights import read_f32, safetensors_index

        # NaN or inf weights fail here, named; the fused graph reads each through read_f32.
        for stored in safetensors_index(model).values():
            read_f32(stored)
        _optimum_export(model, folder)
        return
    _write_fused(model, folder, lora=lora)


def _write_fused(model: Path, folder: Path, matmuls=None, *, lora=None, progress: bool = False):
    """Build the fused graph of ``model`` into ``folder``, its weights written to the data
    file as they are made; a graph whose weights total at most :data:`EXTERNAL_DATA_BYTES`
    is then saved as one file. ``lora``: the projections that take LoRA inputs. Returns the
    graph (large weights external, not loaded)."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import load_external_data_for_model

    from edgeft.export.onnx.graph import ExternalData, build_fused_graph

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / DATA_FILE
    graph = build_fused_graph(model, matmuls=matmuls, data=data, lora=lora, progress=progress)
    check_finite_initializers(graph, folder)
    inline = [t for t in graph.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    if data.stat().st_size + sum(len(t.raw_data) for t in inline) <= EXTERNAL_DATA_BYTES:
        load_external_data_for_model(graph, str(folder))
        data.unlink()
    else:  # the graph's own mid-sized tensors join the large ones
        with ExternalData(data, append=True) as sink:
            for tensor in inline:
                if len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                    tensor.CopyFrom(sink.tensor(tensor.name, numpy_helper.to_array(tensor)))
    (folder / MODEL_FILE).write_bytes(graph.SerializeToString())
    _companions(model, folder)
    return graph


def _passes(count: int) -> str:
    return f"{count} pass" if count == 1 else f"{count} passes"


def _make_folder(
    quant: str,
    fp32: Path,
    folder: Path,
    settings: QuantSettings,
    calibrate=None,
    kv_scales=None,
) -> None:
    """Write the ``quant`` folder from the fp32 export (optimum's trace, or the types the
    fused graph has no direct writer for). ``calibrate(bits by module)`` returns the
    :class:`~edgeft.export.onnx.gptq.Calibration` of the int4 folder."""
    if quant == "fp16":
        model = to_fp16(_load(fp32))
        check_finite_initializers(model, folder)
        _save(model, folder)
    elif quant == "int8-dynamic":
        folder.mkdir(parents=True, exist_ok=True)
        dynamic_int8(fp32 / MODEL_FILE, folder / MODEL_FILE)
        check_finite_initializers(_load(folder), folder)
    else:  # int8, int4: weight-only
        model = _load(fp32)
        fold_transposed_weights(model)
        plan = bits_plan(model, quant, settings)
        if quant == "int4" and calibrate is not None:
            from edgeft.export.onnx.gptq import gptq_matmuls, module_bits, set_norm_weights

            results, norms = calibrate(module_bits(plan)).run()
            gptq_matmuls(model, results, settings.accuracy_level, symmetric=settings.symmetric)
            config = model_config(fp32)
            set_norm_weights(model, norms, architecture_of(config).norm_offset)
            plan = bits_plan(model, quant, settings)  # what GPTQ left: the 8-bit matrices
        model = quantize_weights(model, plan, settings, mixed=quant == "int4")
        embeddings = settings.embedding_precision(quant)
        if embeddings != "fp32":
            quantize_embeddings(model, 8 if embeddings == "int8" else 4, settings.block_size)
        pack_qkv(model)
        # the fused graph's; optimum's trace keeps fp32
        set_kv_cache(model, settings.kv_cache_type(quant), kv_scales)
        check_finite_initializers(model, folder)
        _save(model, folder)
    _companions(fp32, folder)


def _write_quantized(
    model: Path,
    folder: Path,
    quant: str,
    settings: QuantSettings,
    calibrate,
    *,
    progress: bool,
    kv_scales=None,
    lora=None,
) -> None:
    """The fused graph's ``int8`` or ``int4`` folder, quantized as it is written
    (:mod:`edgeft.export.onnx.nbits`); ``calibrate(bits by module)`` returns the int4 folder's
    :class:`~edgeft.export.onnx.gptq.Calibration`."""
    from edgeft.architectures import PROJECTIONS
    from edgeft.export.onnx.nbits import QuantizedMatmuls

    config = model_config(model)
    matmuls = QuantizedMatmuls(quant, settings, kv_scales=kv_scales)
    if calibrate is not None:
        modules = [
            f"model.layers.{i}.{projection}"
            for i in range(config["num_hidden_layers"])
            for projection in PROJECTIONS
        ]
        plan = matmuls.plan([*modules, "lm_head"])
        matmuls.calibration = calibrate({module: bits for module, bits in plan.items() if bits})
    _write_fused(model, folder, matmuls, lora=lora, progress=progress)


def _ort_format(folder: Path) -> None:
    """Also write ``model.ort`` and ``required_operators.config`` (for a reduced mobile
    onnxruntime build) with onnxruntime's own converter."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime.tools.convert_onnx_models_to_ort",
            str(folder),
            "--optimization_style",
            "Fixed",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise ModelError(f"{folder}: ORT-format conversion failed: {' '.join(tail)}")
    for config in folder.glob("*required_operators*.config"):
        # The converter names the model by its absolute (temporary) path; keep the file name.
        lines = config.read_text(encoding="utf-8").splitlines()
        lines = [
            f"# - {Path(line[4:]).name}" if line.startswith("# - ") else line for line in lines
        ]
        target = folder / "required_operators.config"
        if config != target:
            config.unlink()
        target.write_text("\n".join(lines) + "\n", "utf-8")


def _measure_folder(
    folder: Path, quant: str, reference: Reference, threads: int, adapter: Path | None = None
):
    """Parity in onnxruntime, and whether onnxruntime-genai answers the same greedy tokens;
    with ``adapter``, both with that ``.onnx_adapter`` file applied."""
    session = get_runtime("onnxruntime").load(folder, threads=threads, adapter=adapter)
    try:
        result = measure(session, reference)
    finally:
        session.close()
    genai = get_runtime("onnxruntime-genai").load(folder, threads=threads, adapter=adapter)
    try:
        genai_greedy = generate(genai, reference.prompt_ids, len(result.greedy) or 1)
    finally:
        genai.close()
    return result, first_divergence(result.greedy, genai_greedy) is None


# The export's own genai check (a chat prompt, then a greedy answer) needs this much context.
MIN_GENAI_LENGTH = 128
# Default onnxruntime-genai context: llama.cpp sessions' default (MAX_DEFAULT_CTX). A phone
# chat rarely needs more, and genai pays for the whole context in memory when it loads.
DEFAULT_LENGTH = MAX_DEFAULT_CTX


def export_onnx(
    model: Path,
    out: Path,
    types: str | Sequence[str] = ("fp32", "int8", "int4"),
    *,
    settings: QuantSettings | None = None,
    graph: str = "fused",
    calibration: Path | None = None,
    eval_text: str | None = None,
    ort_format: bool = False,
    max_length: int | None = None,
    adapters: dict[str, Path] | None = None,
    threads: int = DEFAULT_THREADS,
    force: bool = False,
    progress=None,
) -> OnnxExport:
    """Export a Hugging Face checkpoint to one ONNX folder per type and measure each.

    Args:
        model: a full-precision checkpoint (llama, mistral, qwen2) with safetensors weights.
        out: output directory: ``<type>/`` folders and ``edgeft.json``.
        types: from :data:`ONNX_TYPES`.
        settings: quantization choices for the int8 and int4 folders.
        calibration: text or JSONL for GPTQ (see :func:`calibration_texts`).
        graph: ``fused`` (edgeft's graph with onnxruntime's fused attention and norms, the
            fast one) or ``optimum`` (optimum-onnx's trace of the PyTorch model).
        ort_format: also write ``model.ort`` and ``required_operators.config``.
        max_length: onnxruntime-genai's context (``genai_config.json``); default the model's,
            at most :data:`DEFAULT_LENGTH` (llama.cpp sessions' default context). genai
            allocates the whole KV cache for it up front when the cache is shared (the fused
            graph): for SmolLM2-135M, 46 KB a position in fp32 (377 MB at 8192, 189 MB at
            4096).
        adapters: name → ``edgeft train`` adapter trained on ``model`` (the base): the
            folders take LoRA inputs and each adapter is written to
            ``adapters/<name>.onnx_adapter`` (:mod:`edgeft.export.onnx.lora`), then measured
            over every folder against the adapter in PyTorch (fp32 gated, as the base is).

    Raises:
        ModelError: unsupported or quantized checkpoint, a folder a runtime cannot load, or
            an adapter of another base.
        ParityError: the fp32 (or fp16) folder differs from PyTorch beyond tolerance, with or
            without an adapter.
    """
    say = progress or (lambda message: logger.info(message))
    settings = settings or QuantSettings()
    settings.check()
    # Norm tuning follows GPTQ on its calibration text, in the fused graph only: optimum's
    # trace may merge or rename the norm weights, so there are none to replace by name.
    calibrated = settings.algorithm == "gptq"
    untuned = calibrated and graph == "optimum" and settings.norm_epochs > 0
    if untuned or not calibrated:
        settings = replace(settings, norm_epochs=0)
    model, out = Path(model), Path(out)
    types = parse_types(types)
    if graph not in GRAPHS:
        raise EdgeftError(f"--graph must be one of {', '.join(GRAPHS)}; got {graph!r}")
    if graph == "optimum" and importlib.util.find_spec("optimum") is None:
        raise EdgeftError(
            "--graph optimum needs optimum-onnx: pip install 'edgeft[optimum]' (it requires "
            "transformers 4.57); edgeft's own graph, the default, needs neither"
        )
    config, _ = read_export_config(model, SUPPORTED_ARCHITECTURES, "ONNX")
    trained_length = config.get("max_position_embeddings")
    if max_length is not None and (
        max_length < MIN_GENAI_LENGTH or (trained_length and max_length > int(trained_length))
    ):
        raise EdgeftError(
            f"--max-length must be between {MIN_GENAI_LENGTH} and the model's context "
            f"({trained_length}); got {max_length}"
        )
    # onnxruntime-genai allocates the KV cache for its whole context up front: the default is
    # the context llama.cpp sessions get (MAX_DEFAULT_CTX), so the two run at the same one.
    context = max_length or min(int(trained_length or DEFAULT_LENGTH), DEFAULT_LENGTH)
    source_sha256 = weights_sha256(model)
    lora_adapters = _lora_adapters(adapters or {}, model, source_sha256, types, graph)
    lora = lora_modules(lora_adapters) or None

    with atomic_dir(out, force) as work:
        fp32 = work / "fp32" if "fp32" in types else work / ".fp32"
        # The fused graph's int8 and int4 folders are written straight from the checkpoint;
        # the other types are passes over the fp32 graph, which they then need.
        direct = ("int8", "int4") if graph == "fused" else ()
        timings: dict[str, float] = {}
        if any(quant not in direct for quant in types):
            start = time.perf_counter()
            say(f"exporting {model} to ONNX ({graph} graph, fp32, KV cache)")
            _export_fp32(model, fp32, graph, lora)
            timings["fp32"] = time.perf_counter() - start
        calibrate, calibrated_on, streamed = None, None, should_stream(model)
        # GPTQ with norm tuning holds about four fp32 copies: it streams sooner
        calibration_streamed = should_stream(model, CALIBRATION_RESIDENT_SHARE)
        calibrations: list = []
        if "int4" in types and calibrated:
            from edgeft.export.onnx.gptq import Calibration

            texts, calibrated_on = calibration_texts(model, calibration)
            sampled = []
            if settings.sampled_tokens and calibrated_on != SAMPLED and not streamed:
                from edgeft.calibration import sampled_texts

                say(f"sampling {settings.sampled_tokens} tokens of calibration text from {model}")
                sampled = sampled_texts(model, settings.sampled_tokens) or []
                if sampled:
                    calibrated_on += f", plus {settings.sampled_tokens} tokens of {SAMPLED}"

            def calibrate(bits: dict[str, int]) -> Calibration:
                say(f"quantizing the int4 weights with GPTQ, layer by layer, on {calibrated_on}")
                if settings.norm_epochs and not calibration_streamed:
                    say(f"then tuning the norm weights: {_passes(settings.norm_epochs)} over it")
                calibrations.append(
                    Calibration(
                        model, texts, bits, settings, sampled, resident=not calibration_streamed
                    )
                )
                return calibrations[-1]

        def isolated(function, *args, what: str):
            """``(function(*args), peak RSS)``: a big model's runtime work in a process of its
            own, whose peak is what running the folder costs; a small one's here (no process
            start per folder, and no peak)."""
            if streamed:
                return in_child(function, *args, what=what)
            return function(*args), None

        kv_scales = None
        # the fused graph's int8/int4 folders: optimum's trace concatenates its cache itself
        if any(settings.kv_cache_type(quant) == "int8" for quant in set(direct) & set(types)):
            from edgeft.export.onnx.gptq import kv_cache_scales

            say("measuring the KV cache's range on the calibration text, for its int8 scales")
            kv_texts = texts if calibrate is not None else calibration_texts(model, calibration)[0]
            kv_scales = kv_cache_scales(model, kv_texts)
            free_memory()  # its model, loaded whole, before the next one loads
        for quant in types:
            if quant == "fp32":
                continue
            start = time.perf_counter()
            say(f"writing the {quant} folder")
            if quant in direct:
                _write_quantized(
                    model,
                    work / quant,
                    quant,
                    settings,
                    calibrate if quant == "int4" else None,
                    progress=progress is not None,
                    kv_scales=kv_scales,
                    lora=lora,
                )
            else:
                _make_folder(quant, fp32, work / quant, settings, calibrate, kv_scales)
            timings[quant] = time.perf_counter() - start
        for calibration_done in calibrations:
            calibration_done.release()
        from edgeft.export.onnx.genai import write_genai_config

        for quant in types:
            folder = work / quant
            check_external_data(folder)
            write_genai_config(folder, share_buffer=graph == "fused", context_length=context)
            if lora:
                mark_base(folder, source_sha256)
            if ort_format:
                say(f"converting {quant} to the ORT format")
                _ort_format(folder)

        say("measuring every folder against the checkpoint in PyTorch")
        reference = Reference(
            get_runtime("torch").load(model, threads=threads),
            eval_text or default_eval_text(),
            config.get("max_position_embeddings"),
        )
        reports = []
        for quant in types:
            folder = work / quant
            (result, genai_same), runtime_rss = isolated(
                _measure_folder,
                folder,
                quant,
                reference,
                threads,
                what=f"measuring the {quant} folder in onnxruntime",
            )
            files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
            report = FolderReport(
                folder=quant,
                type=quant,
                bytes=sum(
                    (folder / name).stat().st_size
                    for name in (MODEL_FILE, DATA_FILE)
                    if name in files
                ),
                files=files,
                seconds=round(timings[quant], 2),
                parity=result.parity,
                perplexity=result.perplexity,
                greedy_first_divergence=result.greedy_first_divergence,
                genai_greedy_identical=genai_same,
                gated=quant in ("fp32", "fp16"),
                ops=_op_counts(folder),
                runtime_peak_rss_mb=runtime_rss,
            )
            reports.append(report)
            say(
                f"{quant}: {result.parity.summary()}, perplexity {result.perplexity:.3f} "
                f"(checkpoint {reference.perplexity:.3f})"
            )
            _gate(report, model)
        adapter_reports = []
        if lora_adapters:
            adapter_reports = _write_adapters(
                lora_adapters,
                lora,
                work,
                types,
                model,
                source_sha256,
                isolated,
                say,
                eval_text=eval_text,
                context=config.get("max_position_embeddings"),
                threads=threads,
            )
        if "fp32" not in types and fp32.exists():
            shutil.rmtree(fp32)

        notes = [f"int4 calibrated (GPTQ) on {calibrated_on}"] if calibrated_on else []
        if untuned and "int4" in types:
            notes.append("int4 norm weights as trained: norm tuning needs the fused graph")
        if calibrations and not calibrations[-1].resident:
            notes.append(
                f"int4 calibrated on {calibrations[-1].calibrated_tokens} tokens, streamed "
                "layer by layer (the model's fp32 weights exceed an eighth of this machine's "
                "memory, and GPTQ with norm tuning holds about four times them): the token "
                "budget shrinks with the model's size"
            )
            if settings.norm_epochs:
                notes.append(
                    "int4 norm weights as trained: norm tuning backpropagates through the "
                    "whole model beside the checkpoint it distils from, more than half of "
                    "this machine's memory"
                )
        elif calibrated_on and settings.norm_epochs:
            notes.append(
                f"int4 norm weights tuned to the checkpoint: {_passes(settings.norm_epochs)} "
                "over the calibration text"
            )
        say("checking onnxruntime-genai's tokenizer against the Hugging Face tokenizer")
        tokenizer, _ = isolated(  # onnxruntime-genai loads the whole folder to tokenize
            _check_genai_tokenizer,
            work / types[0],
            model,
            threads,
            what="checking onnxruntime-genai's tokenizer",
        )
        if tokenizer["mismatches"]:
            first = tokenizer["mismatches"][0]
            notes.append(
                f"onnxruntime-genai's tokenizer gives other ids than the Hugging Face tokenizer "
                f"on {len(tokenizer['mismatches'])} of {tokenizer['texts']} texts (first: "
                f"{first['text'][:40]!r} at token {first['at']}): an app that tokenizes with "
                "onnxruntime-genai feeds the model other ids on such text"
            )
        if tokenizer["chat_template_identical"] is False:
            notes.append(
                "onnxruntime-genai renders the chat template differently from transformers: "
                "an app should render prompts itself and pass the text"
            )
        if any(not r.genai_greedy_identical for r in reports):
            odd = ", ".join(r.folder for r in reports if not r.genai_greedy_identical)
            notes.append(f"onnxruntime-genai's greedy answer differs from onnxruntime's in {odd}")
        write_record(
            work,
            make_record(
                "export-onnx",
                inputs={
                    "model": {
                        "path": model.resolve(),
                        "weights_sha256": source_sha256,
                        "architecture": config.get("architectures", [None])[0],
                    }
                },
                settings={
                    "types": types,
                    "quantization": asdict(settings),
                    "ort_format": ort_format,
                    "max_length": context,
                    "threads": threads,
                    "calibration": calibrated_on,
                    "calibration_tokens": (
                        calibrations[-1].calibrated_tokens if calibrations else None
                    ),
                    "eval_tokens": len(reference.eval_ids),
                    "fp32_tolerance": {"max_abs_diff": FP32_MAX_ABS_DIFF, "mean_kl": FP32_MAX_KL},
                    "adapters": {
                        a.name: {
                            "path": a.source.resolve(),
                            "sha256": a.sha256,
                            "method": a.method,
                            "rank": a.rank,
                        }
                        for a in lora_adapters
                    },
                },
                results={
                    "reference": "the checkpoint in PyTorch fp32",
                    "reference_perplexity": reference.perplexity,
                    "folders": [r.as_dict() for r in reports],
                    "adapters": [r.as_dict() for r in adapter_reports],
                    "genai_tokenizer": tokenizer,
                    "notes": notes,
                    # this process's own; each folder's runtime process: runtime_peak_rss_mb
                    "peak_rss_mb": peak_rss_mb(),
                },
            ),
        )
    return OnnxExport(
        out=out,
        folders=reports,
        reference_perplexity=reference.perplexity,
        eval_tokens=len(reference.eval_ids),
        settings=settings,
        notes=notes,
        adapters=adapter_reports,
    )


# The types written straight from the checkpoint by the fused graph, which can take LoRA inputs;
# fp16 and int8-dynamic are passes over a whole fp32 graph that would rewrite them.
LORA_TYPES = ("fp32", "int8", "int4")


def _lora_adapters(adapters: dict, model: Path, source_sha256: str, types, graph: str):
    """The adapters to export over ``model``, read and checked (nothing written yet)."""
    if not adapters:
        return []
    if graph != "fused":
        raise EdgeftError("--adapter needs the fused graph (--graph fused)")
    other = [quant for quant in types if quant not in LORA_TYPES]
    if other:
        raise EdgeftError(
            f"--adapter: the {', '.join(other)} folder cannot take LoRA inputs; choose --type "
            f"among {', '.join(LORA_TYPES)}"
        )
    return read_adapters(adapters, model, source_sha256)


def _write_adapters(
    adapters,
    lora,
    work: Path,
    types,
    model: Path,
    source_sha256: str,
    isolated,
    say,
    *,
    eval_text,
    context,
    threads: int,
) -> list[AdapterReport]:
    """Write each adapter's ``.onnx_adapter`` file, then measure base + adapter in every
    folder (onnxruntime, then onnxruntime-genai) against the adapter over the fp32 base in
    PyTorch; the fp32 folder is gated like the base."""
    from edgeft.runtimes.pytorch import load_over_full_precision

    folder = work / ADAPTERS_DIR
    folder.mkdir()
    reports = []
    for adapter in adapters:
        path = folder / f"{adapter.name}{ONNX_ADAPTER_SUFFIX}"
        write_adapter(path, adapter, lora, source_sha256)
        say(f"measuring base + adapter {adapter.name} against the adapter in PyTorch")
        reference = Reference(
            load_over_full_precision(adapter.source, model, adapter.record, threads=threads),
            eval_text or default_eval_text(),
            context,
        )
        folders = []
        for quant in types:
            (result, genai_same), runtime_rss = isolated(
                _measure_folder,
                work / quant,
                quant,
                reference,
                threads,
                path,
                what=f"measuring the {quant} folder with adapter {adapter.name}",
            )
            report = FolderReport(
                folder=quant,
                type=quant,
                bytes=path.stat().st_size,
                files={path.name: sha256_file(path)},
                seconds=0.0,
                parity=result.parity,
                perplexity=result.perplexity,
                greedy_first_divergence=result.greedy_first_divergence,
                genai_greedy_identical=genai_same,
                gated=quant == "fp32",
                runtime_peak_rss_mb=runtime_rss,
            )
            say(
                f"{quant} + {adapter.name}: {result.parity.summary()}, perplexity "
                f"{result.perplexity:.3f} (adapter in PyTorch {reference.perplexity:.3f})"
            )
            _gate(report, model, f"with adapter {path.name}")
            folders.append(report)
        reports.append(
            AdapterReport(
                name=adapter.name,
                file=f"{ADAPTERS_DIR}/{path.name}",
                sha256=sha256_file(path),
                bytes=path.stat().st_size,
                modules=len(adapter.pairs),
                rank=adapter.rank,
                base_weights_sha256=source_sha256,
                reference_perplexity=reference.perplexity,
                folders=folders,
            )
        )
        del reference
        free_memory()
    return reports


def _check_genai_tokenizer(folder: Path, model: Path, threads: int) -> dict:
    """onnxruntime-genai's tokenizer, the one an app on the device runs, against the Hugging
    Face tokenizer: ids of the fidelity corpus, and the chat prompt as each renders it
    (``chat_template_identical`` is None without a chat template)."""
    from transformers import AutoTokenizer

    from edgeft.fidelity import GREEDY_PROMPT, TOKENIZER_CORPUS

    hf = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    session = get_runtime("onnxruntime-genai").load(folder, threads=threads)
    try:
        mismatches = []
        for text in TOKENIZER_CORPUS:
            expected = list(hf(text, add_special_tokens=False)["input_ids"])
            got = session.tokenize(text)
            if got != expected:
                mismatches.append({"text": text, "at": first_divergence(expected, got)})
        identical = None
        if hf.chat_template:
            expected = chat_ids(hf, [{"role": "user", "content": GREEDY_PROMPT}])
            try:
                identical = session.tokenize(GREEDY_PROMPT, chat=True) == list(expected)
            except ModelError:
                identical = False
    finally:
        session.close()
    return {
        "texts": len(TOKENIZER_CORPUS),
        "mismatches": mismatches,
        "chat_template_identical": identical,
    }


def _gate(report: FolderReport, model: Path, adapted: str = "") -> None:
    """Raise where a folder (``adapted``: with that adapter applied) is off beyond tolerance."""
    parity = report.parity
    model = f"{model} {adapted}" if adapted else model
    finite = math.isfinite(parity.mean_kl) and math.isfinite(parity.max_abs_diff)
    if report.type == "fp16" and not finite:
        raise ParityError(
            f"the fp16 ONNX model of {model} overflows: its activations exceed fp16's range "
            f"(±65504) and its logits are not finite ({parity.summary()}); export fp32, int8 "
            "or int4 instead (they compute in fp32); nothing was written"
        )
    if report.type == "fp32" and not (
        parity.max_abs_diff <= FP32_MAX_ABS_DIFF and parity.mean_kl <= FP32_MAX_KL
    ):
        raise ParityError(
            f"the fp32 ONNX model differs from {model} in PyTorch: {parity.summary()} "
            f"(tolerance: max |Δlogit| ≤ {FP32_MAX_ABS_DIFF}, mean KL ≤ {FP32_MAX_KL}); "
            "nothing was written"
        )
    if report.type == "fp32" and not report.genai_greedy_identical:
        raise ModelError(
            "onnxruntime-genai generates other greedy tokens than onnxruntime from the fp32 "
            f"folder{adapted and ' ' + adapted}; its genai_config.json does not describe the "
            "graph; nothing was written"
        )
    if report.type == "fp16" and not parity.mean_kl <= FP16_MAX_KL:
        raise ParityError(
            f"the fp16 ONNX model differs from {model}: {parity.summary()} (tolerance: mean KL "
            f"≤ {FP16_MAX_KL}); nothing was written"
        )
