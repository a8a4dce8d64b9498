"""Runtimes: load an artifact and run it behind one small protocol (:mod:`edgeft.session`).

The harness owns timing and scoring; a runtime only loads, tokenizes and runs. Each runtime
module is imported only when it is used, so a missing optional dependency matters only to the
runtime that needs it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

from edgeft.errors import EdgeftError
from edgeft.session import Session


class Runtime(Protocol):
    name: str

    def available(self) -> bool: ...

    def load(self, artifact: Path, *, threads: int) -> Session: ...


# name → module under edgeft.runtimes exposing RUNTIME. Later formats add rows here.
RUNTIMES = {
    "torch": "pytorch",
    "llama.cpp": "llamacpp",
    "onnxruntime": "onnxrt",
    "onnxruntime-genai": "ortgenai",
}


def get_runtime(name: str) -> Runtime:
    """Return the runtime called ``name``.

    Raises:
        EdgeftError: unknown name (the message lists the known ones).
    """
    module = RUNTIMES.get(name)
    if module is None:
        raise EdgeftError(f"unknown runtime {name!r}; choose from: {', '.join(sorted(RUNTIMES))}")
    return importlib.import_module(f"{__name__}.{module}").RUNTIME
