"""The in-context baseline: the base model shown worked examples in its prompt instead of
being fine-tuned.

Each question gets an optional system prompt and the ``k`` training rows whose user turn is
most similar to it, as earlier chat turns. Similarity is TF-IDF cosine over lowercase words
(ties keep file order); the most similar example is placed last, next to the question. A
training row whose user turn is the question itself (after case and space folding) is never
shown. When the prompt would not fit the model's context, the least similar examples are
dropped first.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from edgeft.data import iter_rows, row_to_messages
from edgeft.errors import DataError
from edgeft.evaluate import QARow, normalize

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


class ExamplePool:
    """Worked examples (a user turn and the assistant's reply) and a TF-IDF index of their
    user turns."""

    def __init__(self, examples: Sequence[tuple[str, str]]):
        if not examples:
            raise DataError("no worked examples: the training data has no user/assistant rows")
        self.examples = list(examples)
        counts = [Counter(words(user)) for user, _ in self.examples]
        documents = Counter(word for c in counts for word in c)
        n = len(counts)
        self._idf = {word: math.log((1 + n) / (1 + df)) + 1 for word, df in documents.items()}
        self._vectors = [self._vector(c) for c in counts]
        self._questions = [normalize(user) for user, _ in self.examples]

    @classmethod
    def from_file(cls, path: Path) -> ExamplePool:
        """The first user turn and the assistant reply after it from each row of a training
        file (any format :func:`edgeft.data.row_to_messages` reads)."""
        examples = []
        for where, row in iter_rows(path):
            if isinstance(row, DataError):
                raise row
            messages = row_to_messages(row, where)
            roles = [m["role"] for m in messages]
            if "user" not in roles:
                continue
            i = roles.index("user")
            if i + 1 < len(messages) and roles[i + 1] == "assistant":
                examples.append((messages[i]["content"], messages[i + 1]["content"]))
        return cls(examples)

    def _vector(self, counts: Counter) -> dict[str, float]:
        vector = {w: c * self._idf.get(w, 0.0) for w, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vector.values())) or 1.0
        return {w: v / norm for w, v in vector.items()}

    def nearest(self, question: str, k: int) -> list[int]:
        """Indices of the ``k`` examples most similar to ``question``, most similar first;
        examples whose user turn is the question itself are left out."""
        query = self._vector(Counter(words(question)))
        same = normalize(question)
        scored = [
            (-sum(weight * vector.get(w, 0.0) for w, weight in query.items()), i)
            for i, vector in enumerate(self._vectors)
            if self._questions[i] != same
        ]
        return [i for _, i in sorted(scored)[:k]]

    def context(self, question: str, k: int, system: str | None = None) -> list[dict]:
        """Chat turns to put before ``question``: the system prompt, then the ``k`` nearest
        examples, least similar first."""
        turns = [{"role": "system", "content": system}] if system else []
        for i in reversed(self.nearest(question, k)):
            user, reply = self.examples[i]
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return turns


def with_examples(
    rows: Sequence[QARow],
    pool: ExamplePool,
    k: int,
    *,
    system: str | None = None,
    fits: Callable[[QARow], bool] | None = None,
) -> list[QARow]:
    """``rows`` with in-context examples as each one's ``context``.

    Args:
        k: examples per question (0: the system prompt alone).
        fits: whether a row's prompt fits the model's context; examples are dropped, least
            similar first, until it does.

    Raises:
        DataError: a question does not fit even without examples.
    """
    if k < 0:
        raise DataError(f"the number of in-context examples must be >= 0, got {k}")
    out = []
    for row in rows:
        for shown in range(k, -1, -1):
            candidate = replace(row, context=tuple(pool.context(row.question, shown, system)))
            if fits is None or fits(candidate):
                break
        else:
            raise DataError(f"{row.where}: the question does not fit the model's context")
        out.append(candidate)
    return out
