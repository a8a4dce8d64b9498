"""``edgeft inspect``: what is inside a GGUF, ONNX or safetensors file, read without trusting it.

Only headers and tables are read, every length checked against the file before it is used;
no tensor data is loaded and nothing is unpickled. A damaged or crafted file is a
:class:`~edgeft.errors.ModelError` naming the file and the field, never a crash, a hang or a
huge allocation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgeft.errors import ModelError
from edgeft.formats import (
    GENAI_CONFIG,
    ONNX_MODEL_FILE,
    PICKLE_SUFFIXES,
    detect,
    external_data_path,
    genai_model_files,
    titles,
)
from edgeft.hfcompat import model_config
from edgeft.weights import inspect_safetensors

SUPPORTED = titles(lambda f: f.inspected_as is not None)

# A protobuf message cannot exceed 2 GiB; a larger model.onnx is not a graph onnx can parse.
ONNX_MAX_PROTO = 2 << 30
# genai_config.json is a few kilobytes; anything far larger is not one.
GENAI_MAX_BYTES = 1 << 20

# ONNX TensorProto data type name → bits per element (STRING has no fixed size).
ONNX_BITS = {
    "FLOAT": 32,
    "UINT8": 8,
    "INT8": 8,
    "UINT16": 16,
    "INT16": 16,
    "INT32": 32,
    "INT64": 64,
    "BOOL": 8,
    "FLOAT16": 16,
    "DOUBLE": 64,
    "UINT32": 32,
    "UINT64": 64,
    "COMPLEX64": 64,
    "COMPLEX128": 128,
    "BFLOAT16": 16,
    "FLOAT8E4M3FN": 8,
    "FLOAT8E4M3FNUZ": 8,
    "FLOAT8E5M2": 8,
    "FLOAT8E5M2FNUZ": 8,
    "UINT4": 4,
    "INT4": 4,
    "FLOAT4E2M1": 4,
    "FLOAT8E8M0": 8,
    "UINT2": 2,
    "INT2": 2,
}

# Quantized ONNX operators whose bits and block size are reported, with the defaults the
# contrib operator schemas give when the attribute is absent.
QUANT_OPS = {"MatMulNBits": 4, "GatherBlockQuantized": 4}


def inspect_file(path: Path) -> dict:
    """Describe a model file from its header: format, metadata, tensors, quantization.

    Args:
        path: a ``.gguf`` file, a ``.onnx`` file or a folder holding ``model.onnx``, or a
            ``.safetensors`` file.

    Returns:
        A JSON-serializable dict; ``format`` is ``"gguf"``, ``"onnx"`` or ``"safetensors"``.

    Raises:
        ModelError: a missing path, an unsupported or pickled file, or a header that does not
            fit the file (the message names the file and the field).
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder; pass one of: {SUPPORTED}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"{path}: pickled checkpoint: edgeft does not unpickle files; convert it to safetensors"
        )
    found = detect(path)
    if found is None or found.inspected_as is None:
        if path.is_dir():
            raise ModelError(
                f"{path} is a folder without {ONNX_MODEL_FILE} or config.json; pass one of: "
                f"{SUPPORTED}"
            )
        suffix = path.suffix.lower()
        kind = f"{suffix!r} files" if suffix else "files without an extension"
        raise ModelError(f"{path}: edgeft cannot inspect {kind}; supported: {SUPPORTED}")
    readers = {
        "gguf": inspect_gguf,
        "onnx": lambda p: inspect_onnx(p / ONNX_MODEL_FILE if p.is_dir() else p),
        "checkpoint": inspect_checkpoint,
        "safetensors": inspect_safetensors,
        "onnx_adapter": inspect_onnx_adapter,
    }
    return readers[found.inspected_as](path)


# --- GGUF -------------------------------------------------------------------------------------


def inspect_gguf(path: Path) -> dict:
    """A GGUF file's header through the bounds-checked reader (arrays counted, not kept)."""
    from edgeft.gguf_file import file_type_name, read_gguf

    info = read_gguf(path)
    meta = info.metadata
    arch = meta.get("general.architecture")
    lengths = info.array_lengths

    def key(name: str):
        return meta.get(f"tokenizer.ggml.{name}")

    tokenizer = None
    if any(k.startswith("tokenizer.") for k in (*meta, *lengths)):
        tokenizer = {
            "model": key("model"),
            "pre": key("pre"),
            "vocab_size": lengths.get("tokenizer.ggml.tokens"),
            "merges": lengths.get("tokenizer.ggml.merges"),
            "bos_token_id": key("bos_token_id"),
            "eos_token_id": key("eos_token_id"),
            "padding_token_id": key("padding_token_id"),
            "add_bos_token": key("add_bos_token"),
            "has_chat_template": bool(meta.get("tokenizer.chat_template")),
        }
    prefix = f"{arch}." if isinstance(arch, str) else None
    return {
        "format": "gguf",
        "path": str(path),
        "bytes": path.stat().st_size,
        "version": info.version,
        "architecture": arch,
        "type": meta.get("general.type", "model"),
        "file_type": file_type_name(meta),
        "tensor_count": len(info.tensors),
        "parameter_count": sum(math.prod(t.shape) for t in info.tensors),
        "tensor_types": info.tensor_type_counts(),
        "context_length": meta.get(f"{arch}.context_length") if prefix else None,
        "hyperparameters": {
            k[len(prefix) :]: v for k, v in meta.items() if prefix and k.startswith(prefix)
        },
        "general": {k: v for k, v in meta.items() if k.startswith("general.")},
        "adapter": {k: v for k, v in meta.items() if k.startswith("adapter.")},
        "edgeft": {k: v for k, v in meta.items() if k.startswith("edgeft.")},
        "tokenizer": tokenizer,
        "arrays": dict(lengths),
    }


# --- safetensors ------------------------------------------------------------------------------


def inspect_checkpoint(path: Path) -> dict:
    """A Hugging Face checkpoint folder: its architecture as edgeft's table describes it (the
    quirks the stages handle, each layer's attention) and what each stage does with it.

    Raises:
        ModelError: an unreadable config.json or safetensors header.
    """
    from edgeft.architectures import (
        ARCHITECTURES,
        activation,
        attention_shape,
        layer_attention,
        module_names,
        rope_kind,
        rotary_dim,
        tied_embeddings,
    )

    config_path = path / "config.json"
    config = model_config(config_path)
    names = config.get("architectures") or []
    entry = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    weights = sorted(path.glob("*.safetensors"))
    parameters = sum(inspect_safetensors(w)["parameter_count"] for w in weights)
    info = {
        "format": "checkpoint",
        "path": str(path),
        "architecture": names[0] if names else config.get("model_type"),
        "model_type": config.get("model_type"),
        "weights": [w.name for w in weights],
        "parameter_count": parameters,
        "supported": entry is not None,
    }
    if entry is None:
        info["stages"] = {
            "export": f"not supported; supported architectures: {', '.join(ARCHITECTURES)}"
        }
        return info
    stages: dict[str, str] = {}
    try:
        layers = layer_attention(entry, config, config_path)
        shape = attention_shape(config)
        act = activation(config, config_path)
    except (ModelError, KeyError, TypeError, ValueError) as exc:
        info["stages"] = {"export": f"refused: {exc}"}
        return info
    quirks = [
        name
        for name, on in (
            ("q/k norms", entry.qk_norm),
            ("(1 + w) norms", entry.norm_offset),
            ("four norms a layer", entry.sandwich_norms),
            ("embedding × √hidden", entry.embed_scale),
            ("fused " + ", ".join(f.module.split(".")[1] for f in entry.fused), entry.fused),
            (f"rope {rope_kind(config.get('rope_scaling'))}", True),
            (
                f"rotary on {rotary_dim(config)} of {shape.head_dim}",
                rotary_dim(config) < shape.head_dim,
            ),
            ("rope-free layers", not all(layer.rope for layer in layers)),
            ("sliding windows", any(layer.window for layer in layers)),
            ("tied embeddings", tied_embeddings(config)),
            (f"{act} MLP", True),
        )
        if on
    ]
    stages["train"] = "LoRA / QLoRA targets: " + ", ".join(module_names(entry))
    stages["gguf"] = f"llama.cpp {entry.gguf_arch}"
    try:
        from edgeft.export.gguf.convert import read_model_spec

        stages["gguf"] += "".join(f"; {note}" for note in read_model_spec(path).notes)
    except ModelError as exc:
        stages["gguf"] = f"refused: {exc}"
    stages["onnx"] = (
        f"fused graph, onnxruntime-genai type {entry.genai_type}"
        if entry.fused_graph
        else "optimum graph only"
    )
    info.update(
        layers=len(layers),
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        quirks=quirks,
        windows=sorted({layer.window for layer in layers if layer.window}),
        stages=stages,
    )
    return info


# --- ONNX -------------------------------------------------------------------------------------


def inspect_onnx(model_path: Path) -> dict:
    """An ONNX graph read without its external data: opsets, inputs and outputs, operators,
    initializers by dtype, weight-only quantization, external-data files (each checked to lie
    inside the folder) and the folder's ``genai_config.json``.

    Raises:
        ModelError: the graph cannot be parsed, or an initializer's external data points
            outside the folder, is missing, or is shorter than the tensor needs.
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError as exc:
        raise ModelError(
            f"inspecting {model_path} needs the onnx package: pip install 'edgeft[onnx]'"
        ) from exc
    folder = model_path.parent
    size = model_path.stat().st_size
    if size >= ONNX_MAX_PROTO:
        raise ModelError(
            f"{model_path}: {size} bytes is past protobuf's 2 GiB limit; not an ONNX graph"
        )
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{model_path}: not a readable ONNX graph ({reason})") from None
    graph = model.graph

    nodes: dict[str, int] = {}
    quant: dict[tuple, int] = {}
    for node in graph.node:
        nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
        if node.op_type in QUANT_OPS:
            attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
            spec = (
                node.op_type,
                attrs.get("bits", QUANT_OPS[node.op_type]),
                attrs.get("block_size"),
            )
            quant[spec] = quant.get(spec, 0) + 1

    by_dtype: dict[str, dict[str, int]] = {}
    external: dict[str, dict] = {}
    for tensor in graph.initializer:
        dtype = _onnx_dtype_name(tensor.data_type)
        if any(d < 0 for d in tensor.dims):
            raise ModelError(
                f"{model_path}: initializer {tensor.name!r} has a negative dimension "
                f"{list(tensor.dims)}"
            )
        elements = math.prod(tensor.dims)
        bits = ONNX_BITS.get(dtype)
        nbytes = -(-elements * bits // 8) if bits else len(tensor.raw_data)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            nbytes = _external_bytes(model_path, tensor, nbytes, external)
        elif tensor.raw_data:
            nbytes = len(tensor.raw_data)
        entry = by_dtype.setdefault(dtype, {"count": 0, "bytes": 0, "elements": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
        entry["elements"] += elements

    return {
        "format": "onnx",
        "path": str(model_path),
        "bytes": size,
        "ir_version": model.ir_version,
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "inputs": [_value_info(v) for v in graph.input],
        "outputs": [_value_info(v) for v in graph.output],
        "node_count": len(graph.node),
        "nodes": dict(sorted(nodes.items(), key=lambda kv: (-kv[1], kv[0]))),
        "initializer_count": len(graph.initializer),
        "initializers": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"])),
        "quantization": [
            {"op": op, "bits": bits, "block_size": block, "count": count}
            for (op, bits, block), count in sorted(quant.items(), key=lambda kv: -kv[1])
        ],
        "external_data": external,
        "genai_config": _genai_summary(folder),
        "lora": _lora_summary(model),
    }


def _lora_summary(model) -> dict | None:
    """The LoRA inputs of a base exported with ``--adapter`` and the base identity it records."""
    names = [v.name for v in model.graph.input if v.name.endswith((".lora_A", ".lora_B"))]
    if not names:
        return None
    base = next((p.value for p in model.metadata_props if p.key == "edgeft.source.sha256"), None)
    return {"modules": len(names) // 2, "base_weights_sha256": base}


def inspect_onnx_adapter(path: Path) -> dict:
    """An onnxruntime adapter file (``.onnx_adapter``): its versions and LoRA pairs.

    Raises:
        ModelError: a file onnxruntime cannot read as an adapter.
    """
    import onnxruntime as ort

    try:
        reader = ort.AdapterFormat.read_adapter(str(path))
        parameters = reader.get_parameters()
    except Exception as exc:  # onnxruntime raises plain RuntimeError/Fail on a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: not an onnxruntime adapter file ({reason})") from None
    ranks: dict[int, int] = {}
    empty = 0
    for name, value in parameters.items():
        if name.endswith("lora_A"):
            rank = value.shape()[-1]
            if rank:
                ranks[rank] = ranks.get(rank, 0) + 1
            else:
                empty += 1
    return {
        "format": "onnx_adapter",
        "path": str(path),
        "bytes": path.stat().st_size,
        "format_version": reader.get_format_version(),
        "adapter_version": reader.get_adapter_version(),
        "model_version": reader.get_model_version(),
        "parameters": len(parameters),
        "ranks": dict(sorted(ranks.items())),
        "empty_modules": empty,
        "types": sorted({str(v.data_type()) for v in parameters.values()}),
    }


def _onnx_dtype_name(data_type: int) -> str:
    import onnx

    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"type {data_type}"


def _external_bytes(model_path: Path, tensor, nbytes: int, external: dict) -> int:
    """Bytes of one external initializer, from its ``length`` entry (else its shape), after
    checking its location lies inside the folder and the file holds the bytes it claims."""
    from onnx.external_data_helper import ExternalDataInfo

    try:
        info = ExternalDataInfo(tensor)
    except ValueError as exc:
        raise ModelError(
            f"{model_path}: initializer {tensor.name!r}: bad external_data entry ({exc})"
        ) from None
    data = external_data_path(
        model_path.parent,
        info.location,
        model_path,
        f"the external data of initializer {tensor.name!r}",
    )
    offset = info.offset or 0
    length = info.length if info.length is not None else nbytes
    file_size = data.stat().st_size
    if offset + length > file_size:
        raise ModelError(
            f"{model_path}: initializer {tensor.name!r}: external data offset {offset} + length "
            f"{length} runs past the end of {info.location} ({file_size} bytes)"
        )
    entry = external.setdefault(info.location, {"bytes": file_size, "tensors": 0, "used": 0})
    entry["tensors"] += 1
    entry["used"] += length
    return length


def _value_info(value) -> dict:
    """Name, element type and shape (ints, symbolic names, or None) of a graph input/output."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": value.name, "type": kind, "shape": None}
    tensor = value.type.tensor_type
    shape = None
    if tensor.HasField("shape"):
        shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        ]
    return {"name": value.name, "type": _onnx_dtype_name(tensor.elem_type), "shape": shape}


def _genai_summary(folder: Path) -> dict | None:
    """The parts of ``genai_config.json`` an app developer checks, and every model file it
    names checked to lie inside the folder."""
    path = folder / GENAI_CONFIG
    if not path.is_file():
        return None
    if path.stat().st_size > GENAI_MAX_BYTES:
        raise ModelError(f"{path}: {path.stat().st_size} bytes is too large for a genai config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise ModelError(f"{path}: field 'model' is missing or not an object")
    decoder = model.get("decoder") if isinstance(model.get("decoder"), dict) else {}
    search = config.get("search") if isinstance(config.get("search"), dict) else {}
    files = genai_model_files(model, path)
    for name in files:
        external_data_path(folder, name, path, "a model 'filename'")
    return {
        "type": model.get("type"),
        "decoder": decoder.get("filename"),
        "files": files,
        "context_length": model.get("context_length"),
        "vocab_size": model.get("vocab_size"),
        "bos_token_id": model.get("bos_token_id"),
        "eos_token_id": model.get("eos_token_id"),
        "pad_token_id": model.get("pad_token_id"),
        "num_hidden_layers": decoder.get("num_hidden_layers"),
        "num_key_value_heads": decoder.get("num_key_value_heads"),
        "head_size": decoder.get("head_size"),
        "max_length": search.get("max_length"),
        "past_present_share_buffer": search.get("past_present_share_buffer"),
    }


# --- rendering --------------------------------------------------------------------------------


def render_inspection(info: dict) -> str:
    """A readable summary of :func:`inspect_file`'s result."""
    render = {
        "gguf": _render_gguf,
        "onnx": _render_onnx,
        "safetensors": _render_safetensors,
        "checkpoint": _render_checkpoint,
        "onnx_adapter": _render_onnx_adapter,
    }
    return "\n".join(render[info["format"]](info)).rstrip() + "\n"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _short(value, width: int = 80) -> str:
    if isinstance(value, float):
        return f"{value:.7g}"  # GGUF floats are float32: 1e-05, not 9.999999747378752e-06
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def _rows(rows: list[tuple[str, object]], indent: int = 2) -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [f"{' ' * indent}{k.ljust(width)}  {v}" for k, v in rows if v is not None]


def _render_onnx_adapter(info: dict) -> list[str]:
    lines = [f"{info['path']}: onnxruntime LoRA adapter, {_size(info['bytes'])}"]
    ranks = ", ".join(f"rank {r} ×{n}" for r, n in info["ranks"].items()) or "-"
    rows = [
        ("versions", f"format {info['format_version']}, adapter {info['adapter_version']}"),
        ("base", f"model_version {info['model_version']} (edgeft: the base weights' identity)"),
        ("tensors", f"{info['parameters']}: {', '.join(info['types'])}"),
        ("modules", f"{ranks}; {info['empty_modules']} empty (left as the base)"),
    ]
    return lines + _rows(rows)


def _render_checkpoint(info: dict) -> list[str]:
    lines = [
        f"{info['path']}: Hugging Face checkpoint, {info['architecture']} "
        f"({info['parameter_count']:,} parameters in {len(info['weights'])} safetensors files)"
    ]
    rows = []
    if "layers" in info:
        rows += [
            (
                "attention",
                f"{info['layers']} layers, {info['heads']} heads ({info['kv_heads']} KV) of "
                f"{info['head_dim']}"
                + (f", sliding windows {info['windows']}" if info["windows"] else ""),
            ),
            ("quirks", ", ".join(info["quirks"])),
        ]
    rows += [(stage, text) for stage, text in info["stages"].items()]
    return lines + _rows(rows)


def _render_gguf(info: dict) -> list[str]:
    lines = [f"{info['path']}: GGUF v{info['version']}, {_size(info['bytes'])}"]
    rows = [
        ("type", info["type"]),
        ("architecture", info["architecture"]),
        ("file type", info["file_type"]),
        ("tensors", f"{info['tensor_count']} ({info['parameter_count']:,} parameters)"),
        ("tensor types", _counts(info["tensor_types"])),
        ("context length", info["context_length"]),
    ]
    tok = info["tokenizer"]
    if tok:
        rows.append(
            (
                "tokenizer",
                f"{tok['model']} (pre {tok['pre']}), {tok['vocab_size']} tokens, "
                f"{tok['merges'] if tok['merges'] is not None else 'no'} merges, bos "
                f"{tok['bos_token_id']}, eos {tok['eos_token_id']}, chat template: "
                f"{'yes' if tok['has_chat_template'] else 'no'}",
            )
        )
    lines += _rows(rows)
    for title in ("hyperparameters", "general", "adapter", "edgeft"):
        if info[title]:
            lines.append(f"  {title}:")
            lines += _rows([(k, _short(v)) for k, v in info[title].items()], indent=4)
    return lines


def _render_onnx(info: dict) -> list[str]:
    lines = [f"{info['path']}: ONNX (IR {info['ir_version']}), {_size(info['bytes'])}"]

    def io(values) -> str:
        return "; ".join(
            f"{v['name']} {v['type']}{v['shape'] if v['shape'] is not None else ''}" for v in values
        )

    inputs = info["inputs"]
    rows = [
        ("producer", info["producer"] or "-"),
        ("opsets", _counts(info["opsets"])),
        ("inputs", f"{len(inputs)}: " + _short(io(inputs), 200)),
        ("outputs", f"{len(info['outputs'])}: " + _short(io(info["outputs"]), 200)),
        ("nodes", f"{info['node_count']}: " + _short(_counts(info["nodes"]), 200)),
        (
            "initializers",
            f"{info['initializer_count']}: "
            + ", ".join(
                f"{k} {v['count']} ({_size(v['bytes'])})" for k, v in info["initializers"].items()
            ),
        ),
    ]
    if info["quantization"]:
        rows.append(
            (
                "quantization",
                ", ".join(
                    f"{q['op']} {q['bits']}-bit block {q['block_size']} ×{q['count']}"
                    for q in info["quantization"]
                ),
            )
        )
    if info["external_data"]:
        rows.append(
            (
                "external data",
                ", ".join(
                    f"{name} ({_size(e['bytes'])}, {e['tensors']} tensors)"
                    for name, e in info["external_data"].items()
                ),
            )
        )
    lora = info.get("lora")
    if lora:
        base = (lora["base_weights_sha256"] or "unrecorded")[:12]
        rows.append(("LoRA inputs", f"{lora['modules']} projections, base weights {base}"))
    genai = info["genai_config"]
    if genai:
        rows.append(
            (
                "genai config",
                f"{genai['type']}, decoder {genai['decoder']}, context "
                f"{genai['context_length']}, eos {genai['eos_token_id']}, max_length "
                f"{genai['max_length']}, shared KV buffer {genai['past_present_share_buffer']}",
            )
        )
    return lines + _rows(rows)


def _render_safetensors(info: dict) -> list[str]:
    lines = [f"{info['path']}: safetensors, {_size(info['bytes'])}"]
    lines += _rows(
        [
            ("tensors", f"{info['tensor_count']} ({info['parameter_count']:,} parameters)"),
            ("dtypes", _counts(info["dtypes"])),
            ("header", _size(info["header_bytes"])),
        ]
    )
    if info["metadata"]:
        lines.append("  metadata:")
        lines += _rows([(k, _short(v)) for k, v in info["metadata"].items()], indent=4)
    return lines
