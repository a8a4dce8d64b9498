"""``edgeft bench``: latency, memory and accuracy of every artifact, in one report.

Each artifact runs in its own worker process (``edgeft.bench.worker``), so its peak RSS is its
own. The reference (the merged full-precision checkpoint in PyTorch, found through the
artifacts' provenance unless given) runs first: its logits on the eval text are what every
artifact's KL divergence and top-1 agreement are measured against, fed the very same token ids.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeft import __version__
from edgeft._io import atomic_dir, check_output
from edgeft.bench.artifacts import (
    Artifact,
    as_trained_adapter,
    inferred_reference,
    resolve_artifact,
    unique_names,
    with_adapters,
)
from edgeft.bench.schema import BUDGET_NAMES, SCHEMA, Budgets, decode_speed
from edgeft.errors import DataError, EdgeftError
from edgeft.options import DEFAULT_THREADS

_RUNTIME_PACKAGES = ("llama-cpp-python", "onnxruntime", "onnxruntime-genai")


@dataclass(frozen=True)
class BenchSettings:
    """How each artifact is timed and scored.

    Attributes:
        threads: CPU threads for every runtime (a device profile may lower it).
        prompt_tokens: prompt length for time to first token and prefill speed (256: a chat
            turn with some history).
        decode_tokens: greedy steps timed at each depth.
        depths: KV-cache depths at which decode speed is measured (0, 512, 2048: empty, a
            conversation, a long document), skipped where the model's context is shorter.
        repeats: timed repetitions; figures are the median with min and max.
        warmup: untimed short runs first (page faults, allocator, thread pools).
        max_eval_tokens: eval text tokens scored for perplexity and KL.
        task_max_new_tokens: reply length cap for task accuracy.
        timeout_s: one artifact's worker is stopped after this long.
    """

    threads: int = field(
        default=DEFAULT_THREADS,
        metadata={"help": "CPU threads for every runtime (a device profile may lower it)"},
    )
    prompt_tokens: int = field(
        default=256, metadata={"help": "prompt length for time to first token and prefill"}
    )
    decode_tokens: int = field(default=64, metadata={"help": "greedy steps timed at each depth"})
    depths: tuple[int, ...] = field(
        default=(0, 512, 2048),
        metadata={
            "metavar": "N,...",
            "help": "context depths for decode speed (skipped past the model's context)",
        },
    )
    repeats: int = field(
        default=3, metadata={"help": "timed repetitions: figures are their median, min and max"}
    )
    warmup: int = field(default=1, metadata={"help": "untimed short runs first"})
    max_eval_tokens: int = field(
        default=512, metadata={"help": "eval text tokens scored for perplexity and KL"}
    )
    task_max_new_tokens: int = field(
        default=64, metadata={"help": "reply length cap for task accuracy"}
    )
    timeout_s: float = field(
        default=3600.0,
        metadata={"flag": "--timeout", "metavar": "SECONDS", "help": "seconds per artifact"},
    )

    def __post_init__(self) -> None:
        for name in ("threads", "prompt_tokens", "decode_tokens", "repeats", "max_eval_tokens"):
            if getattr(self, name) < 1:
                raise EdgeftError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup < 0:
            raise EdgeftError("--warmup must be 0 or more")
        if not self.depths or any(d < 0 for d in self.depths):
            raise EdgeftError("--depths must be a list of context depths ≥ 0, e.g. 0,512,2048")


@dataclass
class _Reference:
    name: str
    path: Path
    logits: Path
    perplexity: float | None = None
    eval_ids: list[int] = field(default_factory=list)


def read_eval_text(path: Path | None) -> str:
    """The eval text: a UTF-8 text file, or a JSONL file whose rows' texts are joined (chat
    ``messages``, ``prompt``/``completion``, alpaca rows, ``text``, or ``question``/``answers``).

    Raises:
        DataError: unreadable file or a row with no text (naming ``file:line``).
    """
    from edgeft.fidelity import default_eval_text

    if path is None:
        return default_eval_text()
    path = Path(path)
    if path.suffix != ".jsonl":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read the eval text ({exc})") from None
        if not text.strip():
            raise DataError(f"{path}: the eval text is empty")
        return text
    from edgeft.data import iter_rows, row_to_messages

    parts = []
    for where, row in iter_rows(path):
        if isinstance(row, DataError):
            raise row
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            parts.append(row["text"])
        elif isinstance(row, dict) and isinstance(row.get("question"), str):
            answers = row.get("answers") or [""]
            parts.append(f"{row['question']} {answers[0]}".strip())
        else:
            parts.append("\n".join(m["content"] for m in row_to_messages(row, where)))
    if not parts:
        raise DataError(f"{path}: no rows")
    return "\n\n".join(parts)


def machine_facts() -> dict:
    from edgeft.provenance import cpu_name

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    return {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}",
        "ram_gb": round(ram, 1) if ram else None,
        "bandwidth_gbs": None,
    }


def _versions() -> dict:
    from importlib import metadata

    from edgeft.provenance import package_versions

    versions = package_versions()
    for name in _RUNTIME_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _run_worker(spec: dict, work: Path, label: str, timeout: float) -> dict:
    """Run one worker process; a crash or timeout becomes a failed result naming its log."""
    spec_path, result_path = work / f"{label}.spec.json", work / f"{label}.result.json"
    log_path = work / f"{label}.log"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "edgeft.bench.worker", str(spec_path), str(result_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                env={
                    **os.environ,
                    "TOKENIZERS_PARALLELISM": "false",
                    "EDGEFT_PARENT_PID": str(os.getpid()),
                },
            )
        except subprocess.TimeoutExpired:
            return _failed(f"stopped after {timeout:.0f} s (--timeout)")
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
        if result.get("traceback"):
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(result.pop("traceback"))
        return result
    tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    why = f"the worker exited with code {proc.returncode}"
    if proc.returncode < 0:
        why = f"the worker was killed by signal {-proc.returncode} (out of memory?)"
    return _failed(f"{why}: {tail[-1] if tail else 'no output'}")


def _failed(error: str) -> dict:
    return {"status": "failed", "error": error, "latency": None, "accuracy": None, "notes": []}


def _reference_list(
    artifacts: list[Artifact], references: list[Path] | None, as_trained: bool, log
) -> list[tuple[str, Path]]:
    if references is not None:  # given, possibly none at all
        paths = [Path(p) for p in references]
    else:
        found = [p for p in (inferred_reference(a) for a in artifacts) if p is not None]
        paths = [found[0].resolve()] if found else []
        if paths:
            log(f"reference: {paths[0]} (from the artifacts' edgeft.json)")
        if len({p.resolve() for p in found}) > 1:
            log("note: the artifacts come from different checkpoints; pass --reference")
    named = []
    for path in paths:
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise EdgeftError(
                f"--reference {path}: not a Hugging Face checkpoint or edgeft adapter folder"
            )
        named.append((path.name, path))
    if as_trained:
        if not named:
            raise EdgeftError("--as-trained needs a merged reference (--reference MERGED_DIR)")
        adapter = as_trained_adapter(named[0][1])
        if adapter is None:
            raise EdgeftError(
                f"--as-trained: {named[0][1]}/edgeft.json names no adapter that still exists"
            )
        named.append(("as-trained", adapter))
    names = [n for n, _ in named]
    return [(n if names.count(n) == 1 else f"{n}-{i}", p) for i, (n, p) in enumerate(named)]


def _budget_rows(artifact: dict, budgets: Budgets, device: bool, reference: str | None) -> list:
    latency, accuracy = artifact.get("latency") or {}, artifact.get("accuracy") or {}
    decode = decode_speed(latency, device)
    values = {
        "max_size_mb": artifact["size_bytes"] / 1e6 if artifact.get("size_bytes") else None,
        "max_rss_mb": latency.get("peak_rss_mb"),
        "min_decode_tok_s": decode,
        "max_ttft_ms": (latency.get("ttft_ms") or {}).get("median"),
        "max_mean_kl": (accuracy.get("vs", {}).get(reference) or {}).get("mean_kl")
        if reference
        else None,
        "min_task_accuracy": (accuracy.get("task") or {}).get("accuracy"),
    }
    rows = []
    for name in BUDGET_NAMES:
        limit = getattr(budgets, name)
        if limit is None:
            continue
        value = values[name]
        ok = value is not None and (value <= limit if name.startswith("max") else value >= limit)
        rows.append({"name": name, "limit": limit, "value": value, "passed": ok})
    return rows


def bench(
    artifact_specs: list[str],
    out: Path,
    *,
    references: list[Path] | None = None,
    as_trained: bool = False,
    eval_path: Path | None = None,
    task_path: Path | None = None,
    extra_tasks: dict[str, Path] | None = None,
    extra_texts: dict[str, Path] | None = None,
    device: str | None = None,
    remote: str | None = None,
    runtime: str | None = None,
    settings: BenchSettings | None = None,
    budgets: Budgets | None = None,
    compare: Path | None = None,
    adapters: list[Path] | None = None,
    force: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Measure every artifact and write ``results.json``, ``report.md``, ``report.html`` and the
    plots under ``out``.

    Args:
        artifact_specs: paths, each optionally ``PATH@RUNTIME``.
        references: full-precision checkpoints (or adapters) to measure KL against; default
            (``None``): the checkpoint the artifacts were exported from; ``[]``: none.
        as_trained: also compare against the adapter the reference was merged from, as trained.
        eval_path: text or JSONL for perplexity and KL (default: the shipped cooking text).
        task_path: held-out question JSONL (``question``, ``answers``) for task accuracy.
        extra_tasks: further question sets by name, scored the same way (``accuracy.tasks``);
            budgets read ``task_path``'s accuracy only.
        extra_texts: further texts by name, perplexity only (``accuracy.texts``).
        device: a device profile name or .toml: emulated on the host, predicted, budgeted.
        remote: ``adb:SERIAL`` or ``ssh:user@host``: latency measured on that device.
        budgets: limits; unset ones come from the device profile.
        compare: an earlier results.json: ``comparison.md`` shows the change.
        adapters: LoRA adapter files (``.onnx_adapter``, LoRA ``.gguf``): each artifact they
            apply to is also measured with each applied, as a row of its own.

    Returns:
        The results object (``edgeft.bench.schema``); ``results["passed"]`` is False when an
        artifact failed or missed a budget.
    """
    from edgeft.bench.report import render_comparison, write_reports
    from edgeft.bench.schema import read_results, write_results
    from edgeft.evaluate import as_row, load_qa

    settings = settings or BenchSettings()
    budgets = budgets or Budgets()
    out = Path(out)
    check_output(out, force)
    if not artifact_specs:
        raise EdgeftError("no artifacts given; pass .gguf files or ONNX/checkpoint folders")
    artifacts = unique_names([resolve_artifact(s, runtime) for s in artifact_specs])
    artifacts = with_adapters(artifacts, adapters or [])
    if remote and adapters:
        raise EdgeftError("--adapter is measured on this machine only; leave out --remote")
    eval_text = read_eval_text(eval_path)
    task = load_qa(task_path) if task_path else None
    more_tasks = {name: load_qa(path) for name, path in (extra_tasks or {}).items()}
    more_texts = {name: read_eval_text(path) for name, path in (extra_texts or {}).items()}
    old = read_results(compare) if compare else None
    refs = _reference_list(artifacts, references, as_trained, log)

    profile = emulation = transport = None
    machine = machine_facts()
    threads = settings.threads
    if device:
        from edgeft.devices import get_profile
        from edgeft.devices.emulate import plan_emulation

        profile = get_profile(device)
        budgets = budgets.over(Budgets(**profile.budgets.model_dump()))
        if not remote:
            emulation = plan_emulation(profile, requested_threads=settings.threads)
            threads = emulation.threads
        unsupported = [a.name for a in artifacts if a.runtime not in profile.runtimes]
        if unsupported:
            log(f"note: {profile.name} does not list the runtime of: {', '.join(unsupported)}")
    from edgeft.devices.emulate import measure_host_bandwidth

    # Context for every speed figure, and the host side of device predictions.
    machine["bandwidth_gbs"] = round(measure_host_bandwidth(), 1)
    if remote:
        from edgeft.devices.remote import parse_remote

        transport = parse_remote(remote)

    with (
        atomic_dir(out, force=force) as final,
        tempfile.TemporaryDirectory(prefix="edgeft-bench-") as tmp,
    ):
        work = Path(tmp)
        eval_ids: list[int] | None = None
        ref_rows: list[_Reference] = []
        for i, (name, path) in enumerate(refs):
            log(f"reference {name}: {path} (torch)")
            ref = _Reference(name, path, work / f"reference-{i}.npy")
            spec = {
                "artifact": str(path),
                "runtime": "torch",
                "threads": settings.threads,
                "emulation": None,
                "latency": None,
                "accuracy": _accuracy_spec(eval_ids, eval_text, settings, [], None, ref.logits),
            }
            result = _run_worker(spec, work, f"reference-{i}", settings.timeout_s)
            if result["status"] != "ok":
                raise EdgeftError(f"reference {path} failed: {result['error']}")
            ref.perplexity = result["accuracy"]["perplexity"]
            eval_ids = eval_ids or result["eval_ids"]
            ref_rows.append(ref)

        from tqdm.auto import tqdm

        bar = tqdm(total=len(artifacts), desc="bench", unit="model", disable=not progress)

        def say(message: str) -> None:
            bar.clear()
            log(message)
            bar.refresh()

        rows, raw_results = [], []
        refs_spec = [{"name": r.name, "logits": str(r.logits)} for r in ref_rows]
        task_spec = [as_row(r) for r in task or []]
        extra = {
            "tasks": {name: [as_row(r) for r in rows] for name, rows in more_tasks.items()},
            "texts": more_texts,
        }
        for i, artifact in enumerate(artifacts, 1):
            say(f"[{i}/{len(artifacts)}] {artifact.name} ({artifact.runtime})")
            latency_spec = {
                "prompt_tokens": settings.prompt_tokens,
                "decode_tokens": settings.decode_tokens,
                "depths": list(settings.depths),
                "repeats": settings.repeats,
                "warmup": settings.warmup,
            }
            spec = {
                "artifact": str(artifact.path),
                "adapter": str(artifact.adapter) if artifact.adapter else None,
                "runtime": artifact.runtime,
                "threads": threads,
                "emulation": asdict(emulation) if emulation else None,
                "latency": latency_spec,
                "accuracy": {
                    **_accuracy_spec(eval_ids, eval_text, settings, refs_spec, task_spec),
                    **extra,
                },
            }
            if transport is not None:
                result = _run_remote(transport, artifact, spec, work, i, settings)
            else:
                result = _run_worker(spec, work, f"artifact-{i}", settings.timeout_s)
            raw_results.append(result)
            row = _artifact_row(artifact, result, profile, machine, ref_rows, budgets, remote)
            rows.append(row)
            say("  " + _one_line(row))
            _keep_log(work / f"artifact-{i}.log", final / "logs" / f"{i:02d}.log")
            bar.update()
        bar.close()

        if eval_ids is None:  # no reference: the first artifact's own tokens of the text
            eval_ids = next((r["eval_ids"] for r in raw_results if r.get("eval_ids")), None)
        results = {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "edgeft_version": __version__,
            "machine": machine,
            "versions": _versions(),
            "settings": {
                "threads": threads,
                "prompt_tokens": settings.prompt_tokens,
                "decode_tokens": settings.decode_tokens,
                "depths": list(settings.depths),
                "repeats": settings.repeats,
                "warmup": settings.warmup,
                "eval": {
                    "path": str(eval_path) if eval_path else None,
                    "tokens": len(eval_ids) if eval_ids else None,
                },
                "task": {
                    "path": str(task_path),
                    "questions": len(task),
                    "max_new_tokens": settings.task_max_new_tokens,
                }
                if task
                else None,
                "tasks": {
                    name: {"path": str(extra_tasks[name]), "questions": len(rows)}
                    for name, rows in more_tasks.items()
                },
                "texts": {name: str(path) for name, path in (extra_texts or {}).items()},
                "remote": remote,
            },
            "device": _device_section(profile, emulation, remote),
            "budgets": asdict(budgets),
            "references": [
                {
                    "name": r.name,
                    "path": str(r.path),
                    "runtime": "torch",
                    "perplexity": r.perplexity,
                }
                for r in ref_rows
            ],
            "artifacts": rows,
            "passed": all(r["passed"] for r in rows),
        }
        write_results(final / "results.json", results)
        write_reports(results, final)
        if old is not None:
            (final / "comparison.md").write_text(render_comparison(old, results), encoding="utf-8")
    return results


def _accuracy_spec(eval_ids, eval_text, settings, references, task, save_logits=None) -> dict:
    return {
        "eval_ids": eval_ids,
        "eval_text": eval_text,
        "max_eval_tokens": settings.max_eval_tokens,
        "references": references,
        "task": task or None,
        "task_max_new_tokens": settings.task_max_new_tokens,
        "save_logits": str(save_logits) if save_logits else None,
    }


def _run_remote(transport, artifact: Artifact, spec: dict, work: Path, i: int, settings) -> dict:
    """Latency, perplexity and task accuracy on the device; KL against the references on this
    machine (the same file in the same runtime), where the reference logits are."""
    from edgeft.devices.remote import run_remote

    on_device = {**spec, "accuracy": {**spec["accuracy"], "references": []}}
    try:
        result = run_remote(transport, artifact.path, on_device, timeout=settings.timeout_s)
    except EdgeftError as exc:
        return _failed(str(exc))
    if result.get("status") == "ok" and spec["accuracy"]["references"]:
        here = {**spec, "latency": None, "accuracy": {**spec["accuracy"], "task": None}}
        local = _run_worker(here, work, f"artifact-{i}", settings.timeout_s)
        if local.get("status") == "ok":
            result["accuracy"]["vs"] = local["accuracy"]["vs"]
    result.setdefault("notes", []).append(f"latency measured on {transport.name}")
    return result


def _artifact_row(artifact, result, profile, machine, references, budgets, remote) -> dict:
    row = {
        "name": artifact.name,
        "path": str(artifact.path),
        "adapter": str(artifact.adapter) if artifact.adapter else None,
        "runtime": artifact.runtime,
        "format": artifact.format,
        "quant": artifact.quant,
        "sha256": artifact.sha256(),
        "size_bytes": artifact.size_bytes,
        "context": result.get("n_ctx"),
        "status": result["status"],
        "error": result.get("error"),
        "latency": result.get("latency"),
        "accuracy": result.get("accuracy"),
        "notes": list(result.get("notes", [])),
    }
    latency = row["latency"]
    if latency and profile is not None:
        from edgeft.devices.emulate import (
            kv_bytes_per_token,
            roofline_decode_tok_s,
            scaled_decode_tok_s,
        )

        kv = (
            kv_bytes_per_token(
                artifact.shape.layers, artifact.shape.kv_heads, artifact.shape.head_dim
            )
            if artifact.shape
            else 0
        )
        for entry in latency["decode"]:
            entry["roofline_tok_s"] = roofline_decode_tok_s(
                profile.memory_bandwidth_gbs, artifact.size_bytes, kv, entry["depth"]
            )
            if machine.get("bandwidth_gbs") and not remote:  # remote figures are the device's
                entry["predicted_tok_s"] = scaled_decode_tok_s(
                    entry["tok_s"]["median"], machine["bandwidth_gbs"], profile.memory_bandwidth_gbs
                )
    first = references[0].name if references else None
    row["budgets"] = _budget_rows(row, budgets, profile is not None, first)
    row["passed"] = row["status"] == "ok" and all(b["passed"] for b in row["budgets"])
    return row


def _device_section(profile, emulation, remote) -> dict | None:
    if profile is None:
        return None
    return {
        "name": profile.name,
        "title": profile.title,
        "bandwidth_gbs": profile.memory_bandwidth_gbs,
        "ram_gb": profile.ram_gb,
        "threads": emulation.threads if emulation else profile.threads,
        "applied": list(emulation.applied) if emulation else [f"run on {remote}"],
        "not_emulated": list(emulation.not_emulated) if emulation else [],
    }


def _keep_log(source: Path, target: Path) -> None:
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())


def _one_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"failed: {row['error']}"
    parts = []
    latency, accuracy = row["latency"] or {}, row["accuracy"] or {}
    if latency:
        decode0 = latency["decode"][0] if latency["decode"] else None
        parts.append(f"load {latency['load_s']:.1f} s")
        parts.append(f"TTFT {latency['ttft_ms']['median']:.0f} ms")
        parts.append(f"prefill {latency['prefill_tok_s']['median']:.0f} tok/s")
        if decode0:
            parts.append(f"decode {decode0['tok_s']['median']:.1f} tok/s")
        parts.append(f"peak RSS {latency['peak_rss_mb']:.0f} MB")
    for name, vs in (accuracy.get("vs") or {}).items():
        parts.append(f"KL vs {name} {vs['mean_kl']:.4g}")
    if accuracy.get("perplexity") is not None:
        parts.append(f"perplexity {accuracy['perplexity']:.2f}")
    if accuracy.get("task"):
        parts.append(f"task {accuracy['task']['accuracy']:.1%}")
    missed = [b["name"] for b in row["budgets"] if not b["passed"]]
    if missed:
        parts.append("MISSED " + ", ".join(missed))
    return ", ".join(parts)
