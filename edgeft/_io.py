"""Atomic outputs and file hashing.

Every stage writes one directory. It is assembled under a temporary sibling name and renamed
into place only when complete, so a killed run never leaves a half-written directory under the
final name, and an existing output is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeft.errors import OutputExistsError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """Return one sha256 over several files (name and content, in sorted name order)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def check_output(out: Path, force: bool) -> None:
    """Raise if ``out`` exists and may not be replaced."""
    if out.exists() and not force:
        raise OutputExistsError(
            f"{out} already exists; choose another --out or pass --force to replace it"
        )


def partial_dir(out: Path) -> Path:
    """The working directory a stage fills before it is renamed to ``out``."""
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def atomic_dir(
    out: Path, force: bool = False, *, resume: bool = False, keep_on_error: bool = False
) -> Iterator[Path]:
    """Yield a work directory that becomes ``out`` only if the block finishes.

    Args:
        out: the final directory.
        force: replace an existing ``out``.
        resume: reuse an existing ``<out>.partial`` instead of starting clean.
        keep_on_error: keep ``<out>.partial`` when the block fails (so training checkpoints
            survive a crash and ``--resume`` can pick them up).

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    out = Path(out)
    check_output(out, force)
    work = partial_dir(out)
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        # Move the old output aside first so there is never a moment without a complete one.
        trash = Path(tempfile.mkdtemp(prefix=out.name + ".old.", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(work, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, out)


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """Write text through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_bytes(path: Path, data: bytes) -> None:
    """Write bytes through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
