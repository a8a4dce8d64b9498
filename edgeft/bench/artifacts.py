"""What ``edgeft bench`` is given: artifacts, the runtime each runs in, and their references.

An artifact is a path, optionally followed by ``@RUNTIME``:

* ``model-q4_k_m.gguf`` → llama.cpp;
* an ONNX folder (``model.onnx``; ``genai_config.json`` beside it) → onnxruntime-genai, or
  onnxruntime without a genai_config (``folder@onnxruntime`` picks it explicitly);
* a Hugging Face checkpoint folder (``config.json`` + safetensors) → torch;
* an ``edgeft train`` adapter folder → torch, the adapter on its 4-bit base as trained.

With adapter files (``edgeft bench --adapter``), each base that takes one is also measured
with it applied, as its own row: an ``.onnx_adapter`` on an ONNX folder exported with LoRA
inputs, a LoRA GGUF on the GGUF of its base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeft._io import sha256_files
from edgeft.architectures import attention_shape
from edgeft.errors import EdgeftError, ModelError
from edgeft.formats import GENAI_CONFIG, ONNX_MODEL_FILE, detect, titles
from edgeft.provenance import GgufExportRecord, MergeRecord, OnnxExportRecord, find_record
from edgeft.runtimes import RUNTIMES


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache of one position costs, for bandwidth predictions."""

    layers: int
    kv_heads: int
    head_dim: int
    context: int | None


@dataclass(frozen=True)
class Artifact:
    name: str
    path: Path
    runtime: str
    format: str
    quant: str | None
    files: tuple[Path, ...]  # the model's weight files (hashed and sized), tokenizer excluded
    shape: ModelShape | None
    adapter: Path | None = None  # a LoRA adapter file applied over the base (among files)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def sha256(self) -> str:
        return sha256_files(list(self.files))


def split_runtime(spec: str) -> tuple[str, str | None]:
    """``"path@runtime"`` → ``("path", "runtime")``; a path with no known runtime suffix is kept
    whole (paths may contain ``@``)."""
    head, sep, tail = str(spec).rpartition("@")
    if sep and tail in RUNTIMES:
        return head, tail
    return str(spec), None


def resolve_artifact(spec: str, runtime: str | None = None) -> Artifact:
    """Identify an artifact's format, runtime, weight files and quantization.

    Raises:
        EdgeftError: missing path, not a known format, or a runtime that cannot run it.
    """
    raw, suffix = split_runtime(spec)
    runtime = suffix or runtime
    path = Path(raw)
    if not path.exists():
        raise EdgeftError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".onnx":
        path = path.parent
    found = detect(path)
    if found is None or not found.benchmarked:
        raise EdgeftError(
            f"{path}: not an artifact edgeft can benchmark; expected a "
            f"{titles(lambda f: f.benchmarked)}"
        )
    fmt = found.name
    if fmt == "gguf":
        files, quant, shape = (path,), *_gguf_facts(path)
    elif fmt == "onnx":
        files = tuple(sorted(p for p in path.iterdir() if p.name.startswith(ONNX_MODEL_FILE)))
        quant, shape = _onnx_quant(path), _hf_shape(path / "config.json")
        if runtime is None and not (path / GENAI_CONFIG).is_file():
            runtime = "onnxruntime"
    elif fmt == "adapter":
        quant, shape = "as-trained", None
        files = tuple(sorted(path.glob("adapter_model*.safetensors")))
    else:
        files = tuple(sorted(path.glob("*.safetensors")))
        if not files:
            raise EdgeftError(
                f"{path}: no .safetensors weights (pickled .bin checkpoints are not loaded); "
                "re-save the model with safetensors"
            )
        config = _read_json(path / "config.json")
        quant = _dtype_name(config.get("torch_dtype") or config.get("dtype"))
        shape = _hf_shape(path / "config.json")
    runtime = runtime or found.runtimes[0]
    if runtime not in found.runtimes:
        raise EdgeftError(
            f"{path}: a {fmt} artifact cannot run in {runtime}; choose from: "
            f"{', '.join(found.runtimes)}"
        )
    if not files:
        raise EdgeftError(f"{path}: no weight files found")
    return Artifact(path.name, path, runtime, fmt, quant, files, shape)


def with_adapters(artifacts: list[Artifact], adapters: list[Path]) -> list[Artifact]:
    """Each artifact, followed by one row per adapter file that applies to it (named
    ``int4 + cooking``).

    Raises:
        EdgeftError: an adapter file that is missing, of an unknown kind, or that applies to
            none of the artifacts.
    """
    from dataclasses import replace

    expanded = [[artifact] for artifact in artifacts]
    for adapter in map(Path, adapters):
        if not adapter.is_file():
            raise EdgeftError(f"--adapter {adapter}: no such file")
        if adapter.name.endswith(".onnx_adapter"):
            fits = [a for a in artifacts if a.format == "onnx" and _takes_onnx_adapter(a.path)]
        elif adapter.suffix == ".gguf":
            fits = [a for a in artifacts if a.format == "gguf" and _lora_fits(adapter, a.path)]
        else:
            raise EdgeftError(
                f"--adapter {adapter}: expected an .onnx_adapter file (edgeft export onnx "
                "--adapter) or a LoRA .gguf (edgeft export gguf-lora)"
            )
        if not fits:
            raise EdgeftError(
                f"--adapter {adapter}: none of the artifacts is its base; pass the base "
                "exported with it"
            )
        for artifact in fits:
            row = replace(
                artifact,
                name=f"{artifact.name} + {adapter.name.split('.')[0]}",
                files=(*artifact.files, adapter),
                adapter=adapter,
            )
            expanded[artifacts.index(artifact)].append(row)
    return [row for rows in expanded for row in rows]


def _takes_onnx_adapter(folder: Path) -> bool:
    from edgeft.formats import graph_lora_inputs

    return bool(graph_lora_inputs(folder / "model.onnx")[0])


def _lora_fits(adapter: Path, base: Path) -> bool:
    from edgeft.formats import check_base
    from edgeft.gguf_file import gguf_metadata

    meta = gguf_metadata(adapter)
    if meta.get("general.type") != "adapter":
        raise EdgeftError(f"--adapter {adapter}: not a LoRA GGUF (edgeft export gguf-lora)")
    try:
        check_base(meta, gguf_metadata(base), adapter, base)
    except ModelError:
        return False
    return True


def unique_names(artifacts: list[Artifact]) -> list[Artifact]:
    """Give every artifact a distinct row label: its file or folder name, prefixed by parent
    folders (and suffixed by runtime) where two would otherwise read the same."""
    from dataclasses import replace

    def label(a: Artifact, depth: int) -> str:
        return "/".join(a.path.resolve().parts[-depth:])

    names = [a.name for a in artifacts]
    for depth in (2, 3, 4):
        if len(set(names)) == len(names):
            break
        names = [label(a, depth) if names.count(n) > 1 else n for a, n in _pairs(artifacts, names)]
    if len(set(names)) < len(names):
        names = [
            f"{n}@{a.runtime}" if names.count(n) > 1 else n for a, n in _pairs(artifacts, names)
        ]
    if len(set(names)) < len(names):
        raise EdgeftError(f"the same artifact is listed twice: {', '.join(sorted(names))}")
    return [replace(a, name=n) for a, n in _pairs(artifacts, names)]


def _pairs(artifacts, names):
    return zip(artifacts, names, strict=True)


def inferred_reference(artifact: Artifact) -> Path | None:
    """The full-precision checkpoint an exported artifact was made from, read from the export's
    ``edgeft.json`` (beside a GGUF file, or one folder above an ONNX folder), if it still
    exists."""
    if artifact.format == "hf":
        return None
    for folder in (artifact.path.parent, artifact.path):
        record = find_record(folder)
        if isinstance(record, GgufExportRecord | OnnxExportRecord):
            source = Path(record.inputs.model.path)
            if (source / "config.json").is_file():
                return source
    return None


def as_trained_adapter(reference: Path) -> Path | None:
    """The adapter a merged checkpoint was made from (its ``edgeft.json``), if it still exists."""
    record = find_record(reference)
    if not isinstance(record, MergeRecord):
        return None
    adapter = Path(record.inputs.adapter.path)
    return adapter if (adapter / "adapter_config.json").is_file() else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _dtype_name(dtype) -> str | None:
    names = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    return names.get(str(dtype), str(dtype) if dtype else None)


def _hf_shape(config_path: Path) -> ModelShape | None:
    if not config_path.is_file():
        return None
    config = _read_json(config_path)
    try:
        attention = attention_shape(config)
        return ModelShape(
            layers=int(config["num_hidden_layers"]),
            kv_heads=attention.kv_heads,
            head_dim=attention.head_dim,
            context=config.get("max_position_embeddings"),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _onnx_quant(folder: Path) -> str | None:
    """The folder's precision from its export record, else its name if it is one."""
    from edgeft.export.onnx.quantize import ONNX_TYPES

    record = find_record(folder.parent)
    if isinstance(record, OnnxExportRecord):
        for entry in record.results.folders:
            if entry.folder == folder.name:
                return entry.type
    return folder.name if folder.name in ONNX_TYPES else None


def _gguf_facts(path: Path) -> tuple[str | None, ModelShape | None]:
    from edgeft.gguf_file import file_type_name, gguf_metadata

    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    try:
        heads = int(meta[f"{arch}.attention.head_count"])
        shape = ModelShape(
            layers=int(meta[f"{arch}.block_count"]),
            kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(
                meta.get(f"{arch}.attention.key_length")
                or int(meta[f"{arch}.embedding_length"]) // heads
            ),
            context=meta.get(f"{arch}.context_length"),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        shape = None
    return file_type_name(meta), shape
