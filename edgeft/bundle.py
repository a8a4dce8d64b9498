"""``manifest.json`` of an edgeft bundle (schema ``edgeft.bundle/1``): its typed model and the
one way to write and read it. :mod:`edgeft.package` builds bundles and verifies them.

Paths are relative to the bundle, with ``/`` separators, and never leave it. Bundles written
before adapters carried golden outputs (no ``adapters`` list) read as before.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from edgeft._io import write_json
from edgeft.errors import EdgeftError

SCHEMA = "edgeft.bundle/1"
MANIFEST = "manifest.json"
Target = Literal["android", "ios", "linux-arm64"]
TARGETS = get_args(Target)


def inside(name: str) -> bool:
    """Whether ``name`` is a relative ``/`` path that stays inside the bundle."""
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in name and name != ""


def _inside(name: str) -> str:
    if not inside(name):
        raise ValueError(f"path {name!r} leaves the bundle")
    return name


BundlePath = Annotated[str, AfterValidator(_inside)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Golden(_Strict):
    """A greedy generation the bundle must reproduce in its runtime."""

    prompt: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    output_token_ids: list[int]
    output_text: str


class Runtime(_Strict):
    name: Literal["llama.cpp", "onnxruntime-genai"]
    min_version: str
    tested_with: dict[str, str | None]


class Model(_Strict):
    format: Literal["gguf", "onnx"]
    quant: str | None
    path: BundlePath
    lora: list[BundlePath] = []


class Adapter(_Strict):
    """A LoRA file of ``model.lora``: the base it was made for and its own golden output."""

    path: BundlePath
    base_sha256: str | None = None
    golden: Golden | None = None


class Tokenizer(_Strict):
    files: list[BundlePath]
    chat_template: BundlePath | None
    bos_token_id: int | None
    eos_token_ids: list[int]


class File(_Strict):
    path: BundlePath
    size: int
    sha256: str


class Manifest(_Strict):
    schema_: Literal["edgeft.bundle/1"] = Field(alias="schema")
    created: str
    edgeft_version: str
    target: Target
    runtime: Runtime
    model: Model
    adapters: list[Adapter] | None = None
    tokenizer: Tokenizer
    generation: dict[str, Any]  # generation.json
    files: list[File]  # every file but the manifest
    quantization: dict[str, Any]
    provenance: dict[str, Any]
    bench: dict[str, Any] | None  # the artifact's figures from edgeft bench, if given
    golden: Golden
    notes: list[str]

    def described_adapters(self) -> list[Adapter]:
        """Each adapter file with its entry (older bundles: the path only)."""
        return (
            self.adapters
            if self.adapters is not None
            else [Adapter(path=p) for p in self.model.lora]
        )


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    part = ".".join(str(p) for p in error["loc"]) or "manifest"
    message = error["msg"].removeprefix("Value error, ")
    return f"{part}: {message[0].lower()}{message[1:]}"


def write_manifest(folder: Path, manifest: dict) -> Manifest:
    """Check ``manifest`` against :class:`Manifest` and write it as ``folder/manifest.json``."""
    try:
        typed = Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise EdgeftError(f"the manifest of {folder}: {_first_error(exc)}") from None
    write_json(Path(folder) / MANIFEST, typed.model_dump(mode="json", by_alias=True))
    return typed


def read_manifest(bundle: Path) -> Manifest:
    """The bundle's manifest, whole.

    Raises:
        EdgeftError: no manifest, unreadable, another schema, or a part missing or wrong
            (named).
    """
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise EdgeftError(f"{bundle}: no {MANIFEST}; not an edgeft bundle")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgeftError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else None
        raise EdgeftError(
            f"{path}: schema {found!r} is not {SCHEMA!r}; package it again with this edgeft"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise EdgeftError(f"{path}: {_first_error(exc)}") from None
