"""``edgeft package`` and ``edgeft verify``: a bundle an app can embed, and proof it is intact.

A bundle is a folder (or a zip of it)::

    manifest.json          what everything else is, with sizes and sha256
    model/                 the GGUF file (+ LoRA GGUFs), or the ONNX folder's files
    adapters/              an ONNX bundle's .onnx_adapter files (edgeft export onnx --adapter)
    tokenizer/             tokenizer.json, tokenizer_config.json, chat_template.jinja
    generation.json        generation defaults

``manifest.json`` (schema ``edgeft.bundle/1``) is typed in :mod:`edgeft.bundle`: the target and
runtime, the model file and its LoRA adapters, the tokenizer files, generation defaults, every
other file's size and sha256, the quantization recipe, the provenance, the bench figures and a
golden output.

Each LoRA adapter (``lora``; described in ``adapters``) has its own golden output, with it
applied over the model, and the identity of the base it was made for: the LoRA GGUF's
``edgeft.base.sha256`` (the base file's sha256), or the ``.onnx_adapter``'s base weights'
sha256, which the ONNX graph records. ``edgeft verify`` checks both for every adapter.

The golden output is greedy and reproduces exactly with the same runtime version on the same
kind of CPU; another CPU or runtime version may break a near tie between two tokens.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from edgeft import __version__
from edgeft._io import atomic_dir, check_output, sha256_file, write_json
from edgeft.bundle import MANIFEST, SCHEMA, TARGETS, Golden, Manifest, inside, read_manifest
from edgeft.bundle import write_manifest as _write_manifest
from edgeft.errors import EdgeftError, ModelError
from edgeft.formats import BY_NAME, titles
from edgeft.options import DEFAULT_THREADS
from edgeft.provenance import (
    GgufExportRecord,
    MergeInputs,
    MergeRecord,
    MergeSettings,
    OnnxExportRecord,
    find_record,
)

ExportRecord = GgufExportRecord | OnnxExportRecord

# Oldest runtime known to read what edgeft writes: GGUF v3 with the k-quant and Q8_0 types
# (llama.cpp since 2023-10; b3000+ for the tokenizer pre-types we write, e.g. smollm), and
# genai_config.json with GroupQueryAttention and past_present_share_buffer (onnxruntime-genai
# 0.18, the version edgeft tests against).
MIN_VERSION = {"llama.cpp": "b4000 (llama-cpp-python 0.3.7)", "onnxruntime-genai": "0.18.0"}
TESTED_PACKAGES = {
    "llama.cpp": ("llama-cpp-python", "gguf"),
    "onnxruntime-genai": ("onnxruntime-genai", "onnxruntime"),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
GOLDEN_PROMPT = "Give me three tips for cooking rice well."
GOLDEN_TOKENS = 24


@dataclass
class VerifyReport:
    bundle: Path
    files: int
    golden_tokens: int
    notes: list[str] = field(default_factory=list)
    adapters: int = 0  # LoRA adapters checked (base identity, and golden output when loaded)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _export_record(artifact) -> ExportRecord | None:
    """The export stage's edgeft.json (beside a GGUF file, one folder above an ONNX folder),
    where it lists this artifact."""
    record = find_record(artifact.path.parent)
    if isinstance(record, GgufExportRecord):
        listed = {entry.file for entry in record.results.files}
    elif isinstance(record, OnnxExportRecord):
        listed = {entry.folder for entry in record.results.folders}
    else:
        return None
    return record if artifact.path.name in listed else None


def _merge_parts(record: ExportRecord) -> tuple[MergeInputs, MergeSettings] | None:
    """What the exported checkpoint was merged from: the merge record the export carries
    (GGUF), else the checkpoint's own if it is still there."""
    source = record.inputs.source_record
    if source is not None:
        if source.stage != "merge":
            return None
        return MergeInputs.model_validate(source.inputs), MergeSettings.model_validate(
            source.settings
        )
    merge = find_record(Path(record.inputs.model.path))
    return (merge.inputs, merge.settings) if isinstance(merge, MergeRecord) else None


def _provenance(artifact, record: ExportRecord | None) -> tuple[dict, dict]:
    """(quantization recipe, provenance) from the export record and the merge record it
    carries."""
    if record is None:
        return {"type": artifact.quant}, {"note": "no edgeft.json beside the artifact"}
    merged = _merge_parts(record)
    inputs, settings = merged if merged else (None, None)
    provenance = {
        "source_weights_sha256": record.inputs.model.weights_sha256,
        "architecture": record.inputs.model.architecture,
        "base_model": inputs.base.name if inputs else None,
        "base_weights_sha256": inputs.base.weights_sha256 if inputs else None,
        "adapter_sha256": inputs.adapter.sha256 if inputs else None,
        "merge_base": settings.merge_base if settings else None,
        "train_method": inputs.train.method if inputs else None,
        "export_stage": record.stage,
        "export_settings": record.settings.model_dump(mode="json"),
        "exported_with": record.versions.get("edgeft"),
    }
    recipe: dict = {"type": artifact.quant}
    if isinstance(record, OnnxExportRecord):
        recipe.update(getattr(record.settings, "quantization", None) or {})
    else:
        for entry in record.results.files:
            if entry.file == artifact.path.name:
                recipe["tensor_types"] = getattr(entry, "tensor_types", None)
    return recipe, provenance


def _bench_figures(results_path: Path | None, artifact) -> dict | None:
    """The latest bench figures of ``artifact`` (the row with its sha256)."""
    if results_path is None:
        return None
    from edgeft.bench.schema import read_results

    results = read_results(results_path)
    sha256 = artifact.sha256()
    rows = [a for a in results["artifacts"] if a.get("sha256") == sha256]
    if not rows:
        raise EdgeftError(
            f"--bench {results_path}: no row for this artifact (sha256 {sha256[:12]}); bench "
            "this very file, or leave --bench out"
        )
    row = rows[-1]
    latency, accuracy = row.get("latency") or {}, row.get("accuracy") or {}
    decode = {str(d["depth"]): d["tok_s"]["median"] for d in latency.get("decode", [])}
    return {
        "results_created": results.get("created"),
        "machine": (results.get("machine") or {}).get("cpu"),
        "device": (results.get("device") or {}).get("name"),
        "figures": {
            "load_s": latency.get("load_s"),
            "ttft_ms": (latency.get("ttft_ms") or {}).get("median"),
            "prefill_tok_s": (latency.get("prefill_tok_s") or {}).get("median"),
            "decode_tok_s_by_depth": decode,
            "peak_rss_mb": latency.get("peak_rss_mb"),
            "perplexity": accuracy.get("perplexity"),
            "vs": accuracy.get("vs"),
            "task_accuracy": (accuracy.get("task") or {}).get("accuracy"),
        },
        "budgets": row.get("budgets", []),
        "passed": row.get("passed"),
    }


def _source_dir(record: ExportRecord | None) -> Path | None:
    path = Path(record.inputs.model.path) if record else None
    return path if path and path.is_dir() else None


def _generation_defaults(folder: Path | None, eos: list[int]) -> dict:
    config = _read_json(folder / "generation_config.json") if folder else None
    config = config or {}
    keep = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample")
    defaults = {k: config[k] for k in keep if k in config}
    defaults.setdefault("max_new_tokens", 256)
    defaults["eos_token_ids"] = eos
    return defaults


def _golden(session) -> dict:
    from edgeft.session import generate

    try:
        prompt_ids = session.tokenize(GOLDEN_PROMPT, chat=True)
    except (ModelError, ValueError):
        prompt_ids = session.tokenize(GOLDEN_PROMPT)
    output = generate(session, prompt_ids, GOLDEN_TOKENS)
    return {
        "prompt": GOLDEN_PROMPT,
        "prompt_token_ids": prompt_ids,
        "max_new_tokens": GOLDEN_TOKENS,
        "output_token_ids": output,
        "output_text": session.detokenize(output),
    }


def package(
    artifact_spec: str,
    out: Path,
    target: str,
    *,
    lora: list[Path] | None = None,
    bench_results: Path | None = None,
    make_zip: bool = False,
    threads: int = DEFAULT_THREADS,
    force: bool = False,
) -> Path:
    """Write a bundle for ``target`` from a GGUF file or an ONNX folder (or the pick of an
    ``edgeft recommend`` folder, with the bench figures it was chosen on).

    The artifact is loaded in its runtime once, to record the golden greedy output that
    ``edgeft verify`` and the app's own tests compare against.

    Returns:
        The bundle folder (or the zip, with ``make_zip``).

    Raises:
        EdgeftError: unknown target, an artifact no mobile runtime reads, a bench file with no
            row for this artifact.
    """
    from edgeft.bench.artifacts import resolve_artifact
    from edgeft.runtimes import get_runtime

    if target not in TARGETS:
        raise EdgeftError(f"unknown --target {target!r}; choose from: {', '.join(TARGETS)}")
    from edgeft.recommend import RECOMMENDATION, read_pick

    given = Path(artifact_spec)
    if given.name == RECOMMENDATION or (given.is_dir() and (given / RECOMMENDATION).is_file()):
        pick, measured = read_pick(given)  # edgeft recommend's pick, with its bench figures
        artifact_spec, bench_results = str(pick), bench_results or measured
    artifact = resolve_artifact(artifact_spec)
    # what an app embeds on every target: llama.cpp's C API, or onnxruntime-genai's mobile
    # packages (its Android AAR and iOS pod carry onnxruntime)
    runtime_name = BY_NAME[artifact.format].packaged_with
    if runtime_name is None:
        raise EdgeftError(
            f"{artifact.path}: a {artifact.format} artifact does not run on phones; package a "
            f"{titles(lambda f: f.packaged_with is not None)} (edgeft export gguf|onnx)"
        )
    adapters = [_check_lora(Path(adapter), artifact) for adapter in lora or []]
    names = [adapter.name for adapter, _ in adapters]
    if len(set(names)) < len(names):
        raise EdgeftError("--lora: two adapters have the same file name; rename one")
    final = Path(out)
    if make_zip and final.suffix != ".zip":
        final = final.with_suffix(".zip")
    check_output(final, force)
    record = _export_record(artifact)
    recipe, provenance = _provenance(artifact, record)
    source = _source_dir(record)
    bench = _bench_figures(bench_results, artifact)

    session = get_runtime(runtime_name).load(artifact.path, threads=threads)
    try:
        golden = _golden(session)
        eos = sorted(session.eos_token_ids)
        bos = session.bos_token_id
    finally:
        session.close()
    adapter_goldens = []
    for adapter, base_sha in adapters:
        session = _load_with(runtime_name, artifact.path, adapter, threads)
        try:
            adapter_goldens.append((adapter, base_sha, _golden(session)))
        finally:
            session.close()

    staging = None
    if make_zip:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".edgeft-bundle-", dir=final.parent))
    folder = staging / "bundle" if staging else final
    with atomic_dir(folder, force=force) as work:
        model_dir = work / "model"
        model_dir.mkdir()
        if artifact.format == "gguf":
            shutil.copy2(artifact.path, model_dir / artifact.path.name)
            model_path = f"model/{artifact.path.name}"
            tokenizer_source = source
        else:
            for item in sorted(artifact.path.iterdir()):
                if item.is_file():
                    shutil.copy2(item, model_dir / item.name)
            model_path = "model"
            tokenizer_source = artifact.path
        lora_paths, adapter_entries = [], []
        place = "model" if artifact.format == "gguf" else "adapters"
        (work / place).mkdir(exist_ok=True)
        for adapter, base_sha, adapter_golden in adapter_goldens:
            if (work / place / adapter.name).exists():
                raise EdgeftError(
                    f"--lora {adapter}: a file named {adapter.name} is already in the "
                    "bundle; rename the adapter"
                )
            shutil.copy2(adapter, work / place / adapter.name)
            lora_paths.append(f"{place}/{adapter.name}")
            adapter_entries.append(
                {"path": lora_paths[-1], "base_sha256": base_sha, "golden": adapter_golden}
            )
        tokenizer_files = []
        (work / "tokenizer").mkdir()
        for name in TOKENIZER_FILES:
            if tokenizer_source and (tokenizer_source / name).is_file():
                shutil.copy2(tokenizer_source / name, work / "tokenizer" / name)
                tokenizer_files.append(f"tokenizer/{name}")
        notes = []
        if not tokenizer_files:
            notes.append(
                "no tokenizer files: no source checkpoint is recorded for this GGUF, or it is "
                "not on this machine; the GGUF carries its own vocabulary and chat template"
            )
        generation = _generation_defaults(source or tokenizer_source, eos)
        write_json(work / "generation.json", generation)
        manifest = {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "edgeft_version": __version__,
            "target": target,
            "runtime": {
                "name": runtime_name,
                "min_version": MIN_VERSION[runtime_name],
                "tested_with": _tested_with(runtime_name),
            },
            "model": {
                "format": artifact.format,
                "quant": artifact.quant,
                "path": model_path,
                "lora": lora_paths,
            },
            "adapters": adapter_entries,
            "tokenizer": {
                "files": tokenizer_files,
                "chat_template": "tokenizer/chat_template.jinja"
                if "tokenizer/chat_template.jinja" in tokenizer_files
                else None,
                "bos_token_id": bos,
                "eos_token_ids": eos,
            },
            "generation": generation,
            "files": _file_entries(work),
            "quantization": recipe,
            "provenance": provenance,
            "bench": bench,
            "golden": golden,
            "notes": notes,
        }
        _write_manifest(work, manifest)
    if staging is not None:
        try:
            _zip(folder, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _check_lora(adapter: Path, artifact) -> tuple[Path, str]:
    """``(adapter, the base identity it records)``, refusing an adapter of another kind or
    made for another base than ``artifact``.

    Raises:
        EdgeftError: naming the adapter.
    """
    if not adapter.is_file():
        raise EdgeftError(f"--lora {adapter}: no such file")
    if artifact.format == "gguf":
        from edgeft.gguf_file import gguf_metadata

        if adapter.suffix != ".gguf":
            raise EdgeftError(f"--lora {adapter}: a GGUF bundle takes LoRA GGUFs")
        meta = gguf_metadata(adapter)
        if meta.get("general.type") != "adapter":
            raise EdgeftError(f"--lora {adapter}: not a LoRA GGUF (edgeft export gguf-lora)")
        _check_gguf_base(adapter, meta, artifact.path)
        return adapter, meta.get("edgeft.base.sha256") or ""
    from edgeft.formats import ONNX_ADAPTER_SUFFIX, check_adapter, graph_lora_inputs

    if not adapter.name.endswith(ONNX_ADAPTER_SUFFIX):
        raise EdgeftError(
            f"--lora {adapter}: an ONNX bundle takes {ONNX_ADAPTER_SUFFIX} files (edgeft export "
            "onnx --adapter)"
        )
    try:
        check_adapter(adapter, artifact.path / "model.onnx")
    except ModelError as exc:
        raise EdgeftError(f"--lora {exc}") from None
    return adapter, graph_lora_inputs(artifact.path / "model.onnx")[1] or ""


def _check_gguf_base(adapter: Path, meta: dict, base: Path) -> None:
    """Refuse a LoRA GGUF made for another base than ``base`` (the check llama.cpp loading
    applies: the adapter's recorded base weights against the base's source weights)."""
    from edgeft.formats import check_base
    from edgeft.gguf_file import gguf_metadata

    try:
        check_base(meta, gguf_metadata(base), adapter, base)
    except ModelError as exc:
        raise EdgeftError(f"--lora {exc}") from None


def _load_with(runtime_name: str, model: Path, adapter: Path, threads: int):
    """A session of ``model`` with the LoRA ``adapter`` applied."""
    from edgeft.runtimes import get_runtime

    if runtime_name == "llama.cpp":
        return get_runtime(runtime_name).load(model, threads=threads, lora_path=adapter)
    return get_runtime(runtime_name).load(model, threads=threads, adapter=adapter)


def _tested_with(runtime_name: str) -> dict:
    from importlib import metadata

    versions = {}
    for name in TESTED_PACKAGES[runtime_name]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _file_entries(root: Path) -> list[dict]:
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def _zip(folder: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:  # weights do not compress
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())
    os.replace(tmp, target)


# --- verify -------------------------------------------------------------------------------


def _unzip(bundle: Path, into: Path) -> Path:
    try:
        archive = zipfile.ZipFile(bundle)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EdgeftError(f"{bundle}: not a readable zip ({exc})") from None
    with archive:
        for info in archive.infolist():
            if not inside(info.filename):
                raise EdgeftError(
                    f"{bundle}: member {info.filename!r} would land outside the bundle"
                )
        archive.extractall(into)
    return into


def _check_files(bundle: Path, manifest: Manifest) -> int:
    listed = {entry.path for entry in manifest.files}
    for entry in manifest.files:
        path = bundle / entry.path
        if not path.is_file():
            raise EdgeftError(f"{entry.path}: listed in the manifest but missing from the bundle")
        size = path.stat().st_size
        if size != entry.size:
            raise EdgeftError(
                f"{entry.path}: {size} bytes, the manifest says {entry.size} (truncated "
                "or replaced)"
            )
        if sha256_file(path) != entry.sha256:
            raise EdgeftError(f"{entry.path}: sha256 does not match the manifest (modified)")
    extra = sorted(
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.relative_to(bundle).as_posix() not in listed | {MANIFEST}
    )
    if extra:
        raise EdgeftError(f"{extra[0]}: in the bundle but not in the manifest")
    return len(listed)


def verify(bundle: Path, *, threads: int = DEFAULT_THREADS, load: bool = True) -> VerifyReport:
    """Check a bundle: schema, every file's size and sha256, then a greedy generation in its
    runtime against the golden output.

    Raises:
        EdgeftError: naming the file, field or token that does not match.
    """
    bundle = Path(bundle)
    if not bundle.exists():
        raise EdgeftError(f"{bundle}: no such bundle")
    with tempfile.TemporaryDirectory(prefix="edgeft-verify-") as tmp:
        root = _unzip(bundle, Path(tmp)) if bundle.is_file() else bundle
        manifest = read_manifest(root)
        files = _check_files(root, manifest)
        report = VerifyReport(bundle, files, 0)
        adapters = _check_adapters(root, manifest)
        if load:
            report.golden_tokens = _check_golden(root, manifest, threads)
            for path, golden in adapters:
                report.golden_tokens += _check_golden(root, manifest, threads, path, golden)
        report.adapters = len(manifest.model.lora)
    return report


def _check_adapters(root: Path, manifest: Manifest) -> list[tuple[Path, Golden]]:
    """Each adapter of the bundle with its golden output, its base identity checked against
    the bundle's model.

    Raises:
        EdgeftError: an adapter entry missing from ``lora``, or made for another base.
    """
    entries = manifest.described_adapters()
    if sorted(e.path for e in entries) != sorted(manifest.model.lora):
        raise EdgeftError(f"{MANIFEST}: 'adapters' must describe each file of model.lora")
    model = root / manifest.model.path
    checked = []
    for entry in entries:
        path = root / entry.path
        if manifest.model.format == "gguf":
            from edgeft.gguf_file import gguf_metadata

            _check_gguf_base(path, gguf_metadata(path), model)
        else:
            from edgeft.formats import check_adapter, graph_lora_inputs

            try:
                check_adapter(path, model / "model.onnx")
            except ModelError as exc:
                raise EdgeftError(str(exc)) from None
            recorded = graph_lora_inputs(model / "model.onnx")[1]
            if entry.base_sha256 is not None and entry.base_sha256 != recorded:
                raise EdgeftError(
                    f"{entry.path}: the manifest's base sha256 is not the model's "
                    f"({entry.base_sha256[:12]} vs {str(recorded)[:12]})"
                )
        if entry.golden is not None:
            checked.append((path, entry.golden))
    return checked


def _check_golden(
    root: Path,
    manifest: Manifest,
    threads: int,
    adapter: Path | None = None,
    golden: Golden | None = None,
) -> int:
    from edgeft.runtimes import get_runtime

    golden = golden or manifest.golden
    prompt, expected = golden.prompt_token_ids, golden.output_token_ids
    model = root / manifest.model.path
    runtime_name = manifest.runtime.name
    if adapter is None:
        session = get_runtime(runtime_name).load(model, threads=threads)
    else:
        session = _load_with(runtime_name, model, adapter, threads)
    try:
        from edgeft.session import generate

        output = generate(session, prompt, golden.max_new_tokens)
        if output != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(output, expected, strict=False)) if a != b),
                min(len(output), len(expected)),
            )
            got = session.detokenize(output[at : at + 1]) if at < len(output) else "(end)"
            want = session.detokenize(expected[at : at + 1]) if at < len(expected) else "(end)"
            applied = f" with {adapter.relative_to(root).as_posix()}" if adapter else ""
            raise EdgeftError(
                f"golden output differs at token {at}: got {got!r}, the manifest has {want!r} "
                f"(model {manifest.model.path}{applied})"
            )
    finally:
        session.close()
    return len(expected)
