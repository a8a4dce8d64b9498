"""Parity metrics shared by every stage: how closely one model's next-token distributions
follow another's on the same token ids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Parity:
    """Agreement of a candidate model with a reference over ``positions`` token positions.

    Attributes:
        max_abs_diff: largest absolute logit difference.
        mean_kl: mean KL(reference || candidate) of the next-token distributions, in nats.
        top1_agreement: share of positions whose argmax token is the same.
        positions: number of positions compared.
    """

    max_abs_diff: float
    mean_kl: float
    top1_agreement: float
    positions: int

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"max |Δlogit| {self.max_abs_diff:.2e}, mean KL {self.mean_kl:.2e}, "
            f"top-1 agreement {self.top1_agreement:.2%} over {self.positions} positions"
        )


# Positions compared at once: float64 copies of [positions, vocab] stay small (64 × 128k × 8 B
# = 64 MiB each) however many positions there are.
_CHUNK_POSITIONS = 64


class ParityAccumulator:
    """:func:`compare_logits` over logits that arrive in pieces (rows, batches)."""

    def __init__(self, noise: float = 0.0) -> None:
        self.noise = noise
        self._kl = 0.0
        self._agree = 0
        self._agree_off_ties = 0
        self._max_diff = 0.0
        self._positions = 0
        self._vocab: int | None = None

    def add(self, reference, candidate) -> None:
        """Add ``[positions, vocab]`` logits of the same positions from both models."""
        ref_all, cand_all = _float32(reference), _float32(candidate)
        if ref_all.shape != cand_all.shape or ref_all.ndim != 2:
            raise ValueError(
                f"logit shapes differ or are not 2-D: {tuple(ref_all.shape)} vs "
                f"{tuple(cand_all.shape)}"
            )
        if self._vocab is not None and ref_all.shape[1] != self._vocab:
            raise ValueError(f"vocabulary {ref_all.shape[1]} after {self._vocab}")
        self._vocab = ref_all.shape[1]
        for ref, cand in zip(_rows(ref_all), _rows(cand_all), strict=True):
            ref, cand = ref.astype(np.float64), cand.astype(np.float64)
            log_p, log_q = _log_softmax(ref), _log_softmax(cand)
            kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1).clip(min=0)
            self._kl += float(kl.sum())
            self._agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
            self._agree_off_ties += round(top1_off_ties(ref, cand, self.noise) * len(ref))
            self._max_diff = max(self._max_diff, float(np.abs(ref - cand).max()))
            self._positions += len(ref)

    def top1_off_ties(self) -> float:
        """:func:`top1_off_ties` over every position added, with this accumulator's noise."""
        return self._agree_off_ties / max(1, self._positions)

    def result(self) -> Parity:
        if not self._positions:
            raise ValueError("no positions to compare")
        return Parity(
            max_abs_diff=self._max_diff,
            mean_kl=self._kl / self._positions,
            top1_agreement=self._agree / self._positions,
            positions=self._positions,
        )


def compare_logits(reference, candidate) -> Parity:
    """Compare two ``[positions, vocab]`` logit arrays (numpy arrays or torch tensors).

    KL is computed in float64 from log-softmax, so it stays accurate when the distributions
    are nearly identical, a bounded number of positions at a time. numpy only, so that
    runtimes without torch can be measured.
    """
    accumulator = ParityAccumulator()
    accumulator.add(reference, candidate)
    return accumulator.result()


def top1_off_ties(reference, candidate, noise: float) -> float:
    """Share of positions where the candidate's argmax is the reference's, or a token the
    reference scores within ``2·noise·max|reference|`` of its best: rounding of relative size
    ``noise`` can swap such near-ties on another CPU, so either answer is correct."""
    ref_all, cand_all = _float32(reference), _float32(candidate)
    tie = 2 * noise * max(float(np.abs(ref).max()) for ref in _rows(ref_all))
    agree = 0
    for ref, cand in zip(_rows(ref_all), _rows(cand_all), strict=True):
        ref = ref.astype(np.float64)
        chosen = ref[np.arange(len(ref)), cand.argmax(-1)]
        agree += int((chosen >= ref.max(-1) - tie).sum())
    return agree / len(ref_all)


def _rows(logits: np.ndarray):
    """``logits`` in pieces of :data:`_CHUNK_POSITIONS` rows (views, no copies)."""
    for start in range(0, len(logits), _CHUNK_POSITIONS):
        yield logits[start : start + _CHUNK_POSITIONS]


def _float32(logits) -> np.ndarray:
    """Logits as a numpy array of at least float32 precision (float64 stays float64)."""
    if hasattr(logits, "detach"):  # a torch tensor
        logits = logits.detach().float().cpu().numpy()
    logits = np.asarray(logits)
    return logits if logits.dtype == np.float64 else logits.astype(np.float32, copy=False)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def model_logits(model, rows: Iterable[Sequence[int]]):
    """Float32 logits of a Hugging Face causal LM for each row, concatenated to ``[n, vocab]``."""
    import torch

    device = next(model.parameters()).device
    chunks = []
    with torch.inference_mode():
        for ids in rows:
            batch = torch.tensor([list(ids)], dtype=torch.long, device=device)
            chunks.append(model(input_ids=batch).logits[0].float().cpu())
    return torch.cat(chunks)


def perplexity(logits, token_ids: Sequence[int]) -> float:
    """Perplexity of ``token_ids[1:]`` under ``logits[:-1]`` (``[n, vocab]``, one row per id),
    a bounded number of positions at a time in float64."""
    scores = _float32(logits)
    targets = np.asarray(list(token_ids)[1:], dtype=np.int64)
    if scores.shape[0] != len(token_ids) or len(targets) == 0:
        raise ValueError(f"need one logit row per token and ≥2 tokens, got {tuple(scores.shape)}")
    nll = 0.0
    for start, rows in zip(
        range(0, len(targets), _CHUNK_POSITIONS), _rows(scores[:-1]), strict=True
    ):
        log_probs = _log_softmax(rows.astype(np.float64))
        picked = targets[start : start + len(rows)]
        nll -= float(log_probs[np.arange(len(rows)), picked].sum())
    return float(np.exp(nll / len(targets)))


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    """Index of the first differing token of two generations, ``None`` if they are identical
    (a length difference counts as a divergence where the shorter one ends)."""
    for i, (a, b) in enumerate(zip(reference, candidate, strict=False)):
        if a != b:
            return i
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))
