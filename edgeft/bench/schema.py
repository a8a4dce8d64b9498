"""``results.json`` of ``edgeft bench``: its versioned schema, an example and a validator.

A results file is one JSON object::

    {
      "schema": "edgeft.bench/1",
      "created": "2026-11-26T08:00:00+00:00",
      "edgeft_version": "0.1.0",
      "machine": {"cpu": str, "cores": int, "system": str, "ram_gb": float,
                  "bandwidth_gbs": float | null},          # measured host read bandwidth
      "versions": {package: version | null},
      "settings": {"threads": int, "prompt_tokens": int, "decode_tokens": int,
                   "depths": [int], "repeats": int, "warmup": int,
                   "eval": {"path": str | null, "tokens": int},
                   "task": {"path": str, "questions": int, "max_new_tokens": int} | null,
                   "tasks": {name: {"path": str, "questions": int}},   # further question sets
                   "texts": {name: str},                               # further texts (paths)
                   "remote": str | null},
      "device": null | {"name": str, "title": str, "bandwidth_gbs": float, "ram_gb": float,
                        "threads": int, "applied": [str], "not_emulated": [str]},
      "budgets": {"max_size_mb": float | null, "max_rss_mb": float | null,
                  "min_decode_tok_s": float | null,
                  "max_ttft_ms": float | null, "max_mean_kl": float | null,
                  "min_task_accuracy": float | null},
      "references": [{"name": str, "path": str, "runtime": str, "perplexity": float}],
      "artifacts": [ARTIFACT, ...],
      "passed": bool                                       # every artifact met every budget
    }

    ARTIFACT = {
      "name": str,                       # unique within the file; the row label
      "path": str, "runtime": str, "format": "gguf" | "onnx" | "hf" | "adapter",
      "adapter": str | null,               # a LoRA file applied over the base at ``path``
      "quant": str | null,               # "q4_k_m", "int4", "fp32", ...
      "sha256": str, "size_bytes": int,  # of the model file(s), tokenizer excluded
      "context": int | null,             # tokens the session was loaded for (its KV cache)
      "status": "ok" | "failed", "error": str | null,
      "latency": null | {
        "load_s": float,
        "ttft_ms": STAT, "prefill_tok_s": STAT,
        "decode": [{"depth": int, "tok_s": STAT,
                    "token_ms": {"p50": float, "p90": float, "p99": float},
                    "predicted_tok_s": float | null,        # device prediction, if any
                    "roofline_tok_s": float}],              # with a device: its bandwidth's bound
        "peak_rss_mb": float},           # the artifact's own process, load and run
      "accuracy": null | {
        "perplexity": float | null,
        "vs": {reference_name: {"mean_kl": float, "top1_agreement": float,
                                "max_abs_diff": float, "positions": int}},
        "tokenizer_matches_reference": bool | null,
        "task": null | TASK,
        "tasks": {name: TASK},           # settings.tasks, when given
        "texts": {name: {"perplexity": float | null, "tokens": int}}},  # settings.texts
      "budgets": [{"name": str, "limit": float, "value": float | null, "passed": bool}],
      "passed": bool,
      "notes": [str]
    }
    STAT = {"median": float, "min": float, "max": float}
    TASK = {"accuracy": float, "correct": int, "total": int,
            "prompt_tokens": int, "ttft_ms": float,   # the median-length prompt, median of 3
            "replies": [{"question", "expected", "reply", "correct", "topic", "prompt_tokens"}]}

Figures are in the units their names say (ms, tok/s, MB = 10**6 bytes). A figure that was not
measured is ``null`` (never 0).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeft.errors import EdgeftError

SCHEMA = "edgeft.bench/1"

_TOP_KEYS = ("schema", "machine", "settings", "artifacts")
_ARTIFACT_KEYS = ("name", "runtime", "status", "size_bytes")


def decode_at(latency: dict | None, depth: int = 0) -> dict | None:
    """The ``latency["decode"]`` entry measured at ``depth``, if there is one."""
    return next((d for d in (latency or {}).get("decode", []) if d["depth"] == depth), None)


def validate(results: dict, where: str = "results") -> dict:
    """Check the parts every reader relies on; return ``results``.

    Raises:
        EdgeftError: naming ``where`` and the first missing or wrong part.
    """
    if not isinstance(results, dict):
        raise EdgeftError(f"{where}: not a JSON object")
    schema = results.get("schema")
    if schema != SCHEMA:
        raise EdgeftError(
            f"{where}: schema {schema!r} is not {SCHEMA!r}; re-run 'edgeft bench' with this "
            "version to compare"
        )
    for key in _TOP_KEYS:
        if key not in results:
            raise EdgeftError(f"{where}: missing {key!r}")
    if not isinstance(results["artifacts"], list):
        raise EdgeftError(f"{where}: 'artifacts' must be a list")
    for i, artifact in enumerate(results["artifacts"]):
        if not isinstance(artifact, dict):
            raise EdgeftError(f"{where}: artifacts[{i}] is not an object")
        for key in _ARTIFACT_KEYS:
            if key not in artifact:
                raise EdgeftError(f"{where}: artifacts[{i}] is missing {key!r}")
    return results


def read_results(path: Path) -> dict:
    """Read and validate a results.json.

    Raises:
        EdgeftError: unreadable, not JSON, or not this schema (the message names the file).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeftError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeftError(f"{path}: not a readable results.json ({exc})") from None
    return validate(data, str(path))


def _stat(median: float, spread: float = 0.05) -> dict:
    return {"median": median, "min": median * (1 - spread), "max": median * (1 + spread)}


def example_results() -> dict:
    """A small, complete results object (for tests and for reading the schema)."""

    def artifact(name, runtime, fmt, quant, size_mb, decode, kl, top1, task, rss, passed=True):
        return {
            "name": name,
            "path": f"/models/{name}",
            "runtime": runtime,
            "format": fmt,
            "quant": quant,
            "sha256": "0" * 64,
            "size_bytes": int(size_mb * 1e6),
            "status": "ok",
            "error": None,
            "latency": {
                "load_s": 0.4,
                "ttft_ms": _stat(450.0),
                "prefill_tok_s": _stat(560.0),
                "decode": [
                    {
                        "depth": depth,
                        "tok_s": _stat(decode * factor),
                        "token_ms": {
                            "p50": 1000 / (decode * factor),
                            "p90": 1100 / (decode * factor),
                            "p99": 1300 / (decode * factor),
                        },
                        "predicted_tok_s": None,
                    }
                    for depth, factor in ((0, 1.0), (512, 0.9))
                ],
                "peak_rss_mb": rss,
            },
            "accuracy": {
                "perplexity": 14.3 * (1 + kl),
                "vs": {
                    "merged": {
                        "mean_kl": kl,
                        "top1_agreement": top1,
                        "max_abs_diff": 10 * kl,
                        "positions": 260,
                    }
                },
                "tokenizer_matches_reference": True,
                "task": {"accuracy": task, "correct": round(task * 67), "total": 67},
            },
            "budgets": [
                {"name": "min_decode_tok_s", "limit": 100.0, "value": decode, "passed": passed}
            ],
            "passed": passed,
            "notes": [],
        }

    artifacts = [
        artifact("merged", "torch", "hf", "fp32", 538.0, 35.0, 0.0, 1.0, 0.49, 1200.0, False),
        artifact(
            "model-q8_0.gguf",
            "llama.cpp",
            "gguf",
            "q8_0",
            145.0,
            99.0,
            0.008,
            0.966,
            0.48,
            300.0,
            False,
        ),
        artifact(
            "model-q4_k_m.gguf",
            "llama.cpp",
            "gguf",
            "q4_k_m",
            105.0,
            108.0,
            0.11,
            0.897,
            0.45,
            260.0,
        ),
        artifact(
            "int4", "onnxruntime-genai", "onnx", "int4", 103.0, 117.0, 0.109, 0.862, 0.46, 280.0
        ),
    ]
    failed = artifact("broken.gguf", "llama.cpp", "gguf", None, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    failed.update(
        status="failed",
        error="broken.gguf: not a GGUF file",
        latency=None,
        accuracy=None,
        budgets=[],
        passed=False,
    )
    artifacts.append(failed)
    return {
        "schema": SCHEMA,
        "created": "2026-11-26T08:00:00+00:00",
        "edgeft_version": "0.1.0",
        "machine": {
            "cpu": "AMD EPYC",
            "cores": 2,
            "system": "Linux x86_64",
            "ram_gb": 24.0,
            "bandwidth_gbs": 30.0,
        },
        "versions": {"llama-cpp-python": "0.3.36", "onnxruntime": "1.23.2"},
        "settings": {
            "threads": 2,
            "prompt_tokens": 256,
            "decode_tokens": 64,
            "depths": [0, 512],
            "repeats": 3,
            "warmup": 1,
            "eval": {"path": None, "tokens": 261},
            "task": {"path": "heldout.jsonl", "questions": 67, "max_new_tokens": 64},
        },
        "device": None,
        "budgets": {
            "max_rss_mb": None,
            "min_decode_tok_s": 100.0,
            "max_ttft_ms": None,
            "max_mean_kl": None,
            "min_task_accuracy": None,
        },
        "references": [
            {"name": "merged", "path": "/models/merged", "runtime": "torch", "perplexity": 14.3}
        ],
        "artifacts": artifacts,
        "passed": False,
    }
