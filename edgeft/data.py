"""Training data: JSONL rows → chat messages → token ids with loss masks.

Accepted row forms (one JSON object per line; blank lines are ignored):

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
* prompt/completion: ``{"prompt": "...", "completion": "..."}``
* alpaca: ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional)

The two instruction forms may carry an optional ``"system"`` string. Every row is rendered
through the model's own chat template; the loss is taken only on the tokens of assistant turns
(their text and the template's end-of-turn marker), never on prompts or padding.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.errors import DataError, ModelError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One tokenized row.

    Attributes:
        where: ``file:line`` of the row, for messages.
        input_ids: token ids of the rendered conversation (after truncation).
        labels: ``input_ids`` with every non-assistant position set to ``IGNORE_INDEX``.
        truncated: whether the row was cut at ``max_length``.
    """

    where: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_label_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class DataReport:
    """What loading a dataset found: counts shown to the user and saved in ``edgeft.json``."""

    path: str
    rows: int = 0
    truncated: int = 0
    tokens: int = 0
    label_tokens: int = 0
    skipped: list[str] = field(default_factory=list)


def row_to_messages(row: object, where: str) -> list[dict[str, str]]:
    """Validate one parsed JSON row and return it as chat messages.

    Raises:
        DataError: naming ``where`` and what is wrong with the row.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    forms = [k for k in ("messages", "prompt", "instruction") if k in row]
    if len(forms) != 1:
        raise DataError(
            f"{where}: a row needs exactly one of 'messages', 'prompt'+'completion' "
            f"or 'instruction'+'output'; found keys {sorted(row)}"
        )
    if forms[0] == "messages":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(
                f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects"
            )
    else:
        user_key, answer_key = (
            ("prompt", "completion") if forms[0] == "prompt" else ("instruction", "output")
        )
        for key in (user_key, answer_key):
            if key not in row:
                raise DataError(f"{where}: missing field {key!r}")
            if not isinstance(row[key], str):
                raise DataError(
                    f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}"
                )
        user = row[user_key]
        extra = row.get("input", "")
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        if extra.strip():
            user = f"{user}\n\n{extra}"
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": row[answer_key]},
        ]
        if "system" in row:
            if not isinstance(row["system"], str):
                raise DataError(f"{where}: field 'system' must be a string")
            messages.insert(0, {"role": "system", "content": row["system"]})

    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: message {i} has role {message['role']!r}; "
                f"expected one of {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: message {i} content must be a string, "
                f"got {type(message['content']).__name__}"
            )
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(
                f"{where}: message {i} is an empty assistant turn; "
                "remove the row or write the answer"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(
            f"{where}: no assistant turn, so there is nothing to learn; "
            "add the answer as an assistant message"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(
    tokenizer, messages: list[dict], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return the text and the character spans of assistant turns.

    A span runs from the end of the generation prompt to the end of the rendered turn, so it
    holds the answer and the template's end-of-turn marker.

    Raises:
        DataError: the chat template renders a turn differently once later turns follow it
            (then no consistent mask exists).
    """
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise DataError(
                f"{where}: the chat template renders turn {i} differently when later "
                "turns follow it, so assistant tokens cannot be located"
            )
        spans.append((len(prefix), len(upto)))
    return text, spans


def encode(tokenizer, messages: list[dict], max_length: int, where: str) -> Example:
    """Tokenize a conversation and mask everything but the assistant turns.

    Raises:
        DataError: the answer does not survive truncation (every label would be masked, which
            gives a NaN loss).
    """
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    bos = tokenizer.bos_token
    if getattr(tokenizer, "add_bos_token", False) and bos and not text.startswith(bos):
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (0, 0))
    labels = [IGNORE_INDEX] * len(ids)
    for j, (start, end) in enumerate(offsets):
        if end > start and any(lo <= start < hi for lo, hi in spans):
            labels[j] = ids[j]
    n_labels = sum(label != IGNORE_INDEX for label in labels)
    if n_labels == 0:
        raise DataError(f"{where}: no assistant tokens after rendering; check the chat template")
    truncated = len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(
                f"{where}: the answer is cut off entirely at --max-length {max_length} "
                f"(the row has {len(enc['input_ids'])} tokens); raise --max-length or "
                "shorten the prompt"
            )
    return Example(where, ids, labels, truncated)


def iter_rows(path: Path):
    """Yield ``(where, parsed_row_or_exception)`` for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")


def load_examples(
    path: Path, tokenizer, *, max_length: int, skip_bad_rows: bool = False
) -> tuple[list[Example], DataReport]:
    """Read, validate and tokenize a JSONL dataset.

    Args:
        path: the JSONL file.
        tokenizer: a tokenizer with a chat template.
        max_length: rows longer than this many tokens are truncated (and counted).
        skip_bad_rows: drop bad rows with a counted warning instead of failing.

    Returns:
        The examples and a :class:`DataReport`.

    Raises:
        DataError: a bad row (naming ``file:line``) when ``skip_bad_rows`` is false, or no
            usable rows at all.
        ModelError: the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the tokenizer has no chat template; use an instruct/chat model or add "
            "a chat_template to its tokenizer_config.json"
        )
    if max_length < 8:
        raise DataError(f"--max-length must be at least 8 tokens, got {max_length}")
    report = DataReport(path=str(path))
    examples: list[Example] = []
    for where, row in iter_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            example = encode(tokenizer, row_to_messages(row, where), max_length, where)
        except DataError as exc:
            if not skip_bad_rows:
                raise DataError(f"{exc} (pass --skip-bad-rows to drop bad rows)") from None
            report.skipped.append(str(exc))
            continue
        examples.append(example)
        report.truncated += example.truncated
        report.tokens += len(example.input_ids)
        report.label_tokens += example.n_label_tokens
    report.rows = len(examples)
    if not examples:
        raise DataError(
            f"{path}: no usable rows"
            + (f" ({len(report.skipped)} bad rows skipped)" if report.skipped else "")
        )
    return examples, report


def split_examples(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Shuffle with ``seed`` and hold out ``eval_fraction`` of the rows (at least one row when
    there are two or more)."""
    if not 0 <= eval_fraction < 1:
        raise DataError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_eval = round(len(order) * eval_fraction)
    if eval_fraction > 0 and len(order) >= 2:
        n_eval = max(1, n_eval)
    return order[n_eval:], order[:n_eval]


def collate(batch: Sequence[Example | dict], pad_id: int) -> dict:
    """Right-pad a batch; padding gets ``IGNORE_INDEX`` labels and a zero attention mask. Rows
    that carry a ``"preserve"`` flag (see ``edgeft.train``) pass it on as a bool tensor."""
    import torch

    rows = [
        (b.input_ids, b.labels) if isinstance(b, Example) else (b["input_ids"], b["labels"])
        for b in batch
    ]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if batch and isinstance(batch[0], dict) and "preserve" in batch[0]:
        out["preserve"] = torch.tensor([bool(b["preserve"]) for b in batch])
    return out
