"""``edgeft package`` and ``edgeft verify``: a bundle an app can embed, and proof it is intact.

A bundle is a folder (or a zip of it)::

    manifest.json          what everything else is, with sizes and sha256
    model/                 the GGUF file (+ LoRA GGUFs), or the ONNX folder's files
    adapters/              an ONNX bundle's .onnx_adapter files (edgeft export onnx --adapter)
    tokenizer/             tokenizer.json, tokenizer_config.json, chat_template.jinja
    generation.json        generation defaults

``manifest.json`` (schema ``edgeft.bundle/1``)::

    {"schema": "edgeft.bundle/1", "created": iso, "edgeft_version": str,
     "target": "android" | "ios" | "linux-arm64",
     "runtime": {"name": "llama.cpp" | "onnxruntime-genai", "min_version": str,
                 "tested_with": {package: version}},
     "model": {"format": "gguf" | "onnx", "quant": str, "path": str, "lora": [str]},
     "adapters": [{"path": str, "base_sha256": str, "golden": {...as golden...}}],
     "tokenizer": {"files": [str], "chat_template": str | null,
                   "bos_token_id": int | null, "eos_token_ids": [int]},
     "generation": {...generation.json...},
     "files": [{"path": str, "size": int, "sha256": str}],   # every file but the manifest
     "quantization": {...}, "provenance": {...},
     "bench": null | {"results_created": str, "machine": str, "device": str | null,
                      "figures": {...}, "budgets": [...], "passed": bool},
     "golden": {"prompt": str, "prompt_token_ids": [int], "max_new_tokens": int,
                "output_token_ids": [int], "output_text": str},
     "notes": [str]}

Each LoRA adapter (``lora``; described in ``adapters``) has its own golden output, with it
applied over the model, and the identity of the base it was made for: the LoRA GGUF's
``edgeft.base.sha256`` (the base file's sha256), or the ``.onnx_adapter``'s base weights'
sha256, which the ONNX graph records. ``edgeft verify`` checks both for every adapter.

The golden output is greedy and reproduces exactly with the same runtime version on the same
kind of CPU; another CPU or runtime version may break a near tie between two tokens.

Paths are relative to the bundle, with ``/`` separators, and never leave it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from edgeft import __version__
from edgeft._io import atomic_dir, check_output, sha256_file, write_json
from edgeft.errors import EdgeftError, ModelError

SCHEMA = "edgeft.bundle/1"
MANIFEST = "manifest.json"
TARGETS = ("android", "ios", "linux-arm64")
# The runtime an app embeds for each format on every target: llama.cpp's C API, or
# onnxruntime-genai's mobile packages (its Android AAR and iOS pod carry onnxruntime).
FORMAT_RUNTIME = {"gguf": "llama.cpp", "onnx": "onnxruntime-genai"}
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


def _record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _export_record(artifact) -> dict | None:
    """The export stage's edgeft.json: beside a GGUF file, one folder above an ONNX folder."""
    folder = artifact.path.parent
    record = _record(folder / "edgeft.json")
    return record if record and str(record.get("stage", "")).startswith("export") else None


def _provenance(artifact, record: dict | None) -> tuple[dict, dict]:
    """(quantization recipe, provenance) from the export record and the merge record it
    carries."""
    if record is None:
        return {"type": artifact.quant}, {"note": "no edgeft.json beside the artifact"}
    inputs = record.get("inputs", {})
    source = inputs.get("source_record") or {}
    merge_inputs = source.get("inputs", {})
    provenance = {
        "source_weights_sha256": inputs.get("model", {}).get("weights_sha256"),
        "architecture": inputs.get("model", {}).get("architecture"),
        "base_model": (merge_inputs.get("base") or {}).get("name"),
        "base_weights_sha256": (merge_inputs.get("base") or {}).get("weights_sha256"),
        "adapter_sha256": (merge_inputs.get("adapter") or {}).get("sha256"),
        "merge_base": (source.get("settings") or {}).get("merge_base"),
        "train_method": (merge_inputs.get("train") or {}).get("method"),
        "export_stage": record.get("stage"),
        "export_settings": record.get("settings"),
        "exported_with": (record.get("versions") or {}).get("edgeft"),
    }
    recipe: dict = {"type": artifact.quant}
    if artifact.format == "onnx":
        recipe.update((record.get("settings") or {}).get("quantization") or {})
    else:
        for entry in (record.get("results") or {}).get("files", []):
            if entry.get("file") == artifact.path.name:
                recipe["tensor_types"] = entry.get("tensor_types")
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


def _source_dir(record: dict | None) -> Path | None:
    path = ((record or {}).get("inputs", {}).get("model") or {}).get("path")
    return Path(path) if path and Path(path).is_dir() else None


def _generation_defaults(folder: Path | None, eos: list[int]) -> dict:
    config = _record(folder / "generation_config.json") if folder else None
    config = config or {}
    keep = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample")
    defaults = {k: config[k] for k in keep if k in config}
    defaults.setdefault("max_new_tokens", 256)
    defaults["eos_token_ids"] = eos
    return defaults


def _golden(session) -> dict:
    from edgeft.runtimes import generate

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
    threads: int = 2,
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
    if artifact.format not in FORMAT_RUNTIME:
        raise EdgeftError(
            f"{artifact.path}: a {artifact.format} artifact does not run on phones; package a "
            "GGUF file (edgeft export gguf) or an ONNX folder (edgeft export onnx)"
        )
    runtime_name = FORMAT_RUNTIME[artifact.format]
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
        bos = _bos_token_id(session)
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
        write_json(work / MANIFEST, manifest)
    if staging is not None:
        try:
            _zip(folder, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _bos_token_id(session) -> int | None:
    if hasattr(session, "llm"):  # llama.cpp
        bos = session.llm.token_bos()
        return bos if bos >= 0 else None
    return getattr(getattr(session, "tokenizer", None), "bos_token_id", None)


def _check_lora(adapter: Path, artifact) -> tuple[Path, str]:
    """``(adapter, the base identity it records)``, refusing an adapter of another kind or
    made for another base than ``artifact``.

    Raises:
        EdgeftError: naming the adapter.
    """
    if not adapter.is_file():
        raise EdgeftError(f"--lora {adapter}: no such file")
    if artifact.format == "gguf":
        from edgeft.export.gguf.reader import gguf_metadata

        if adapter.suffix != ".gguf":
            raise EdgeftError(f"--lora {adapter}: a GGUF bundle takes LoRA GGUFs")
        meta = gguf_metadata(adapter)
        if meta.get("general.type") != "adapter":
            raise EdgeftError(f"--lora {adapter}: not a LoRA GGUF (edgeft export gguf-lora)")
        _check_gguf_base(adapter, meta, artifact.path)
        return adapter, meta.get("edgeft.base.sha256") or ""
    from edgeft.export.onnx.lora import ADAPTER_SUFFIX, check_adapter, graph_lora_inputs

    if not adapter.name.endswith(ADAPTER_SUFFIX):
        raise EdgeftError(
            f"--lora {adapter}: an ONNX bundle takes {ADAPTER_SUFFIX} files (edgeft export "
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
    from edgeft.export.gguf.lora import check_base
    from edgeft.export.gguf.reader import gguf_metadata

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


def _safe_member(name: str) -> bool:
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in name and name != ""


def _unzip(bundle: Path, into: Path) -> Path:
    try:
        archive = zipfile.ZipFile(bundle)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EdgeftError(f"{bundle}: not a readable zip ({exc})") from None
    with archive:
        for info in archive.infolist():
            if not _safe_member(info.filename):
                raise EdgeftError(
                    f"{bundle}: member {info.filename!r} would land outside the bundle"
                )
        archive.extractall(into)
    return into


def _manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not path.is_file():
        raise EdgeftError(f"{bundle}: no {MANIFEST}; not an edgeft bundle")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgeftError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise EdgeftError(f"{path}: schema is not {SCHEMA!r}")
    required = {
        "runtime": dict,
        "model": dict,
        "files": list,
        "golden": dict,
        "target": str,
    }
    for key, kind in required.items():
        if not isinstance(manifest.get(key), kind):
            raise EdgeftError(f"{path}: {key!r} is missing or not a {kind.__name__}")
    for i, entry in enumerate(manifest["files"]):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise EdgeftError(f"{path}: files[{i}] needs path, size and sha256")
        if not _safe_member(entry["path"]):
            raise EdgeftError(f"{path}: files[{i}] path {entry['path']!r} leaves the bundle")
    return manifest


def _check_files(bundle: Path, manifest: dict) -> int:
    listed = {entry["path"] for entry in manifest["files"]}
    for entry in manifest["files"]:
        path = bundle / entry["path"]
        if not path.is_file():
            raise EdgeftError(
                f"{entry['path']}: listed in the manifest but missing from the bundle"
            )
        size = path.stat().st_size
        if size != entry["size"]:
            raise EdgeftError(
                f"{entry['path']}: {size} bytes, the manifest says {entry['size']} (truncated "
                "or replaced)"
            )
        if sha256_file(path) != entry["sha256"]:
            raise EdgeftError(f"{entry['path']}: sha256 does not match the manifest (modified)")
    extra = sorted(
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.relative_to(bundle).as_posix() not in listed | {MANIFEST}
    )
    if extra:
        raise EdgeftError(f"{extra[0]}: in the bundle but not in the manifest")
    model_path = manifest["model"].get("path")
    if not isinstance(model_path, str) or not _safe_member(model_path):
        raise EdgeftError(f"{MANIFEST}: model.path {model_path!r} is not a path inside the bundle")
    return len(listed)


def verify(bundle: Path, *, threads: int = 2, load: bool = True) -> VerifyReport:
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
        manifest = _manifest(root)
        files = _check_files(root, manifest)
        report = VerifyReport(bundle, files, 0)
        adapters = _check_adapters(root, manifest)
        if load:
            report.golden_tokens = _check_golden(root, manifest, threads)
            for path, golden in adapters:
                report.golden_tokens += _check_golden(root, manifest, threads, path, golden)
        report.adapters = len(manifest["model"].get("lora") or [])
    return report


def _check_adapters(root: Path, manifest: dict) -> list[tuple[Path, dict]]:
    """Each adapter of the bundle with its golden output, its base identity checked against
    the bundle's model.

    Raises:
        EdgeftError: an adapter entry that is malformed, missing from ``lora``, or made for
            another base.
    """
    lora = manifest["model"].get("lora") or []
    # bundles written before adapters had golden outputs: their base identity only
    entries = manifest.get("adapters", [{"path": p, "golden": None} for p in lora])
    if not isinstance(entries, list) or sorted(e.get("path", "") for e in entries) != sorted(lora):
        raise EdgeftError(f"{MANIFEST}: 'adapters' must describe each file of model.lora")
    model = root / manifest["model"]["path"]
    checked = []
    for entry in entries:
        path = root / entry["path"]
        if not _safe_member(entry["path"]) or not isinstance(entry.get("golden"), dict | None):
            raise EdgeftError(f"{MANIFEST}: adapter {entry['path']!r} needs a path and golden")
        if manifest["model"].get("format") == "gguf":
            from edgeft.export.gguf.reader import gguf_metadata

            _check_gguf_base(path, gguf_metadata(path), model)
        else:
            from edgeft.export.onnx.lora import check_adapter, graph_lora_inputs

            try:
                check_adapter(path, model / "model.onnx")
            except ModelError as exc:
                raise EdgeftError(str(exc)) from None
            recorded = graph_lora_inputs(model / "model.onnx")[1]
            if "base_sha256" in entry and entry["base_sha256"] != recorded:
                raise EdgeftError(
                    f"{entry['path']}: the manifest's base sha256 is not the model's "
                    f"({str(entry.get('base_sha256'))[:12]} vs {str(recorded)[:12]})"
                )
        if entry["golden"] is not None:
            checked.append((path, entry["golden"]))
    return checked


def _check_golden(
    root: Path, manifest: dict, threads: int, adapter: Path | None = None, golden=None
) -> int:
    from edgeft.runtimes import RUNTIMES, get_runtime

    runtime_name = manifest["runtime"].get("name")
    if runtime_name not in RUNTIMES:
        raise EdgeftError(f"{MANIFEST}: unknown runtime {runtime_name!r}")
    golden = golden or manifest["golden"]
    prompt, expected = golden.get("prompt_token_ids"), golden.get("output_token_ids")
    if not (isinstance(prompt, list) and isinstance(expected, list)):
        raise EdgeftError(f"{MANIFEST}: golden needs prompt_token_ids and output_token_ids")
    model = root / manifest["model"]["path"]
    if adapter is None:
        session = get_runtime(runtime_name).load(model, threads=threads)
    else:
        session = _load_with(runtime_name, model, adapter, threads)
    try:
        from edgeft.runtimes import generate

        output = generate(session, prompt, int(golden.get("max_new_tokens", len(expected))))
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
                f"(model {manifest['model']['path']}{applied})"
            )
    finally:
        session.close()
    return len(expected)
