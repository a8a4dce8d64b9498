"""``results.json`` of ``edgeft bench``: its versioned schema (the pydantic models below), an
example, and the one way to read and write it.

The harness writes through :func:`write_results` and every reader reads through
:func:`read_results` (or :func:`validate` for an object in memory), both checked against
:class:`BenchResults`, so the file cannot drift from what is documented here. Readers get the
plain JSON object back.

Figures are in the units their names say (ms, tok/s, MB = 10**6 bytes). A figure that was not
measured is ``null`` (never 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from edgeft._io import write_json
from edgeft.errors import EdgeftError

SCHEMA = "edgeft.bench/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stat(_Strict):
    median: float
    min: float
    max: float


class TokenMs(_Strict):
    p50: float
    p90: float
    p99: float


class Decode(_Strict):
    depth: int  # tokens already in the KV cache
    tok_s: Stat
    token_ms: TokenMs
    predicted_tok_s: float | None = None  # the device profile's prediction, if any
    roofline_tok_s: float | None = None  # with a device: its memory bandwidth's bound


class Latency(_Strict):
    load_s: float
    ttft_ms: Stat
    prefill_tok_s: Stat
    decode: list[Decode]
    peak_rss_mb: float  # the artifact's own process, load and run
    base_rss_mb: float | None = None  # that process before loading (interpreter, libraries)


class Agreement(_Strict):
    mean_kl: float
    top1_agreement: float
    max_abs_diff: float
    positions: int


class Reply(_Strict):
    question: str
    expected: str
    reply: str
    correct: bool
    topic: str | None = None
    prompt_tokens: int | None = None  # not in files of the first edgeft.bench/1 versions


class Task(_Strict):
    accuracy: float
    correct: int
    total: int
    prompt_tokens: int | None = None  # the median-length prompt
    ttft_ms: float | None = None  # on that prompt, median of 3
    replies: list[Reply] = []


class Text(_Strict):
    perplexity: float | None
    tokens: int


class Accuracy(_Strict):
    perplexity: float | None
    vs: dict[str, Agreement]  # reference name -> agreement with it
    tokenizer_matches_reference: bool | None
    task: Task | None = None
    tasks: dict[str, Task] = {}  # settings.tasks, when given
    texts: dict[str, Text] = {}  # settings.texts: perplexity only


class BudgetRow(_Strict):
    name: str
    limit: float
    value: float | None
    passed: bool


class Artifact(_Strict):
    name: str  # unique within the file; the row label
    path: str
    adapter: str | None = None  # a LoRA file applied over the base at ``path``
    runtime: str
    format: Literal["gguf", "onnx", "hf", "adapter"]
    quant: str | None  # "q4_k_m", "int4", "fp32", ...
    sha256: str  # of the model file(s), tokenizer excluded
    size_bytes: int
    context: int | None = None  # tokens the session was loaded for (its KV cache)
    status: Literal["ok", "failed"]
    error: str | None
    latency: Latency | None
    accuracy: Accuracy | None
    budgets: list[BudgetRow]
    passed: bool
    notes: list[str]


class Machine(_Strict):
    cpu: str
    cores: int
    system: str
    ram_gb: float | None
    bandwidth_gbs: float | None  # measured host read bandwidth


class EvalSetting(_Strict):
    path: str | None
    tokens: int | None


class TaskSetting(_Strict):
    path: str
    questions: int
    max_new_tokens: int | None = None


class Settings(_Strict):
    threads: int
    prompt_tokens: int
    decode_tokens: int
    depths: list[int]
    repeats: int
    warmup: int
    eval: EvalSetting
    task: TaskSetting | None = None
    tasks: dict[str, TaskSetting] = {}  # further question sets
    texts: dict[str, str] = {}  # further texts (paths)
    remote: str | None = None  # adb:SERIAL or ssh:user@host


class Device(_Strict):
    name: str
    title: str
    bandwidth_gbs: float
    ram_gb: float
    threads: int
    applied: list[str]
    not_emulated: list[str]


@dataclass(frozen=True)
class Budgets:
    """Limits an artifact must meet; ``None`` is no limit. Sizes in MB are 10⁶ bytes."""

    max_size_mb: float | None = None
    max_rss_mb: float | None = None
    min_decode_tok_s: float | None = None
    max_ttft_ms: float | None = None
    max_mean_kl: float | None = None
    min_task_accuracy: float | None = None

    def over(self, other: Budgets) -> Budgets:
        """These limits, with ``other``'s where this one has none."""
        return Budgets(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) is not None
                else getattr(other, f.name)
                for f in fields(self)
            }
        )


# Figures a budget can bound (min_*: at least, max_*: at most).
BUDGET_NAMES = tuple(f.name for f in fields(Budgets))
# results.json's "budgets": the limits the run applied, one per Budgets field
BudgetLimits = create_model(
    "BudgetLimits",
    __base__=_Strict,
    **{name: (float | None, None) for name in BUDGET_NAMES},
)


class Reference(_Strict):
    name: str
    path: str
    runtime: str
    perplexity: float | None


class BenchResults(_Strict):
    schema_: Literal["edgeft.bench/1"] = Field(alias="schema")
    created: str
    edgeft_version: str
    machine: Machine
    versions: dict[str, str | None]
    settings: Settings
    device: Device | None = None
    budgets: BudgetLimits = BudgetLimits()
    references: list[Reference] = []
    artifacts: list[Artifact]
    passed: bool  # every artifact met every budget


def decode_at(latency: dict | None, depth: int = 0) -> dict | None:
    """The ``latency["decode"]`` entry measured at ``depth``, if there is one."""
    return next((d for d in (latency or {}).get("decode", []) if d["depth"] == depth), None)


def decode_speed(latency: dict | None, device: bool) -> float | None:
    """The decode speed budgets and recommendations judge: from an empty context, the device
    profile's prediction where there is one (``device``), else the measured median."""
    entry = decode_at(latency)
    if entry is None:
        return None
    predicted = entry.get("predicted_tok_s") if device else None
    return predicted if predicted is not None else entry["tok_s"]["median"]


def validate(results: dict, where: str = "results") -> dict:
    """Check ``results`` against :class:`BenchResults`; return it.

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
    try:
        BenchResults.model_validate(results)
    except ValidationError as exc:
        error = exc.errors()[0]
        part = ".".join(str(p) for p in error["loc"]) or "results"
        raise EdgeftError(
            f"{where}: {part}: {error['msg'].lower()} (schema {SCHEMA}); re-run 'edgeft bench' "
            "with this version"
        ) from None
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


def write_results(path: Path, results: dict) -> None:
    """Check ``results`` against the schema, then write it (atomically)."""
    write_json(path, validate(results, f"results for {path}"))


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
