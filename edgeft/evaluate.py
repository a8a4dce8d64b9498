"""Task accuracy: greedy answers to held-out questions, scored by whether the reply contains
an expected key fact.

Held-out JSONL rows: ``{"question": "...", "answers": ["165°F", "74°C"]}`` — a reply is correct
when any answer appears in it (case-insensitive, whitespace collapsed). A row may carry
``"context"``: chat turns rendered before the question (a system prompt, worked examples), as
:mod:`edgeft.incontext` writes them for the in-context baseline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.data import iter_rows
from edgeft.errors import DataError


@dataclass(frozen=True)
class QARow:
    where: str
    question: str
    answers: tuple[str, ...]
    topic: str = ""
    context: tuple[dict, ...] = ()  # chat turns before the question


@dataclass
class TaskResult:
    """Accuracy on a held-out set, with every reply kept for the report."""

    correct: int
    total: int
    replies: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def load_qa(path: Path) -> list[QARow]:
    """Read and validate a held-out question file.

    Raises:
        DataError: naming ``file:line`` for a bad row.
    """
    rows = []
    for where, row in iter_rows(path):
        if isinstance(row, DataError):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        question, answers = row.get("question"), row.get("answers")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: 'question' must be a non-empty string")
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)
        ):
            raise DataError(f"{where}: 'answers' must be a non-empty list of non-empty strings")
        context = _context(row.get("context", []), where)
        rows.append(QARow(where, question, tuple(answers), str(row.get("topic", "")), context))
    if not rows:
        raise DataError(f"{path}: no questions")
    return rows


def _context(turns: object, where: str) -> tuple[dict, ...]:
    roles = ("system", "user", "assistant")
    if not isinstance(turns, list) or not all(
        isinstance(t, dict)
        and t.get("role") in roles
        and isinstance(t.get("content"), str)
        and set(t) == {"role", "content"}
        for t in turns
    ):
        raise DataError(
            f"{where}: 'context' must be a list of {{\"role\": system|user|assistant, "
            '"content": "..."} turns'
        )
    return tuple({"role": t["role"], "content": t["content"]} for t in turns)


def as_row(row: QARow) -> dict:
    """``row`` as a JSONL object :func:`load_qa` reads back."""
    out = {"question": row.question, "answers": list(row.answers)}
    if row.topic:
        out["topic"] = row.topic
    if row.context:
        out["context"] = [dict(turn) for turn in row.context]
    return out


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def contains_answer(reply: str, answers: tuple[str, ...] | list[str]) -> bool:
    """Whether any expected answer occurs in the reply (case-insensitive, spaces collapsed)."""
    reply = normalize(reply)
    return any(normalize(answer) in reply for answer in answers)


def task_accuracy(
    session,
    rows: list[QARow],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "answering",
    prompts: list[list[int]] | None = None,
) -> TaskResult:
    """Answer every question greedily through the session's own chat template and score it.

    Sessions that offer ``generate_batch`` answer ``batch_size`` questions at a time.
    ``prompts``: each row's chat prompt already tokenized by this session (else done here).
    """
    from tqdm.auto import tqdm

    from edgeft.session import BATCH, generate, supports

    result = TaskResult(correct=0, total=len(rows))
    batched = supports(session, BATCH)
    step = batch_size if batched else 1
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="q")
    if prompts is None:
        prompts = [session.tokenize(row.question, chat=True, context=row.context) for row in rows]
    replies: list[str] = []
    for start in range(0, len(rows), step):
        chunk = prompts[start : start + step]
        if batched:
            outputs = session.generate_batch(chunk, max_new_tokens)
        else:
            outputs = [generate(session, chunk[0], max_new_tokens)]
        replies += [session.detokenize(o).strip() for o in outputs]
        bar.update(len(chunk))
    bar.close()
    for row, reply, prompt in zip(rows, replies, prompts, strict=True):
        ok = contains_answer(reply, row.answers)
        result.correct += ok
        result.replies.append(
            {
                "question": row.question,
                "expected": row.answers[0],
                "reply": reply,
                "correct": ok,
                "topic": row.topic,
                "prompt_tokens": len(prompt),
            }
        )
    return result
