"""Runtimes: load an artifact and run it behind one small protocol.

The harness owns timing and scoring; a runtime only loads, tokenizes and runs. Each runtime
module is imported only when it is used, so a missing optional dependency matters only to the
runtime that needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from edgeft.errors import EdgeftError


@runtime_checkable
class Session(Protocol):
    """One loaded model."""

    eos_token_ids: frozenset[int]

    def tokenize(self, text: str, *, chat: bool = False, context: Sequence[dict] = ()) -> list[int]:
        """Token ids of ``text``; with ``chat`` it is a user turn rendered by the chat template
        with the generation prompt appended, after the ``context`` turns (``{"role",
        "content"}`` dicts: a system prompt, worked examples) when given."""
        ...

    def detokenize(self, token_ids: Sequence[int]) -> str: ...

    def logits(self, token_ids: Sequence[int]) -> "np.ndarray":  # noqa: F821 - [n, vocab]
        ...

    def prefill(self, token_ids: Sequence[int]) -> None:
        """Run the prompt and keep its KV cache; the next :meth:`decode_one` continues it."""
        ...

    def decode_one(self) -> int:
        """Greedy next token, extending the KV cache by one position."""
        ...

    def close(self) -> None: ...


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


def chat_messages(text: str, context: Sequence[dict] = ()) -> list[dict]:
    """The conversation a chat prompt renders: the ``context`` turns, then ``text`` as the user
    turn."""
    return [
        *({"role": m["role"], "content": m["content"]} for m in context),
        {"role": "user", "content": text},
    ]


def generate(session: Session, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy generation through a session's KV cache, stopping at an end-of-turn token."""
    session.prefill(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = session.decode_one()
        if token in session.eos_token_ids:
            break
        out.append(token)
    return out
