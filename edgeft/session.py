"""The session protocol: what a loaded model offers the rest of edgeft, whatever runs it.

The runtimes (:mod:`edgeft.runtimes`) implement it; evaluation, fidelity checks, the bench
harness and bundles use only it. The harness owns timing and scoring; a session only
tokenizes and runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

# Optional capabilities: a session lists the ones it has in ``capabilities`` (callers ask
# :func:`supports`, never probe attributes).
BATCH = "generate_batch"  # generate_batch(prompts, max_new_tokens): greedy, prompts at once
ADAPTERS = "set_adapter"  # set_adapter(path | None): apply a LoRA adapter file, or none
# min_new_tokens (an int attribute): end tokens stay masked that many steps after a prefill
MIN_NEW_TOKENS = "min_new_tokens"
CAPABILITIES = frozenset({BATCH, ADAPTERS, MIN_NEW_TOKENS})


@runtime_checkable
class Session(Protocol):
    """One loaded model."""

    eos_token_ids: frozenset[int]
    bos_token_id: int | None  # the token the model's prompts start with, if it has one
    capabilities: frozenset[str]  # the optional ones above this session has

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


class BatchSession(Session, Protocol):
    def generate_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]: ...


class AdapterSession(Session, Protocol):
    def set_adapter(self, adapter: Path | None) -> None: ...


def supports(session: Session, capability: str) -> bool:
    """Whether ``session`` has the optional ``capability`` (one of :data:`CAPABILITIES`)."""
    return capability in session.capabilities


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
