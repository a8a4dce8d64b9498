"""Bounds for comparing the floats of two runtimes, kernels or computation orders.

The same model computed twice in a different order rounds differently: x·W + (x·A)·B against
x·(W + A·B), an AVX2 kernel against an AVX-512 or NEON one (other SIMD widths, other partial
sums), one thread against four. A bound that one machine's outcome picked fails on another
CPU, so every bound here comes from the arithmetic:

- fp32 reassociation. A length-K dot product summed in another order differs by at most
  K·u·Σ|aᵢbᵢ| (u = 2⁻²⁴, the fp32 unit roundoff), typically √K·u. The tiny test models
  (hidden 64, MLP 128, 2 layers) chain about 16 products, each renormalised by an RMSNorm,
  so the logits can move by about 16 · 128 · u ≈ 1.2e-4 of their scale in the worst case
  and 50-80x less in practice (benchmarks/results/kernel_paths.md). ``FP32_ORDER`` is that
  worst case.
- fp16 weights. Rounding each weight to F16 moves each term of a product by at most 2⁻¹¹ of
  itself, so each of the ~16 chained products by 2⁻¹¹·Σ|aᵢbᵢ|: ``FP16_WEIGHTS``.
- fp16 rounding. llama.cpp keeps the KV cache in F16 and rounds q to F16 for q·k, so two
  computations whose fp32 values differ by rounding noise can land on neighbouring halves:
  an element then moves by one half ulp step, up to 2⁻¹⁰ of its magnitude. A product of two
  such vectors moves by up to 2·2⁻¹⁰ of Σ|aᵢbᵢ|; through attention's scores and values in
  two layers, ``FP16_ROUNDING`` = 8·2⁻¹⁰ ≈ 7.8e-3 of the logits' scale bounds it.
- fp16 compute (an fp16 ONNX graph): both inputs of every product rounded, and on CPUs with
  fp16 arithmetic the sums too: ``FP16_COMPUTE``.

"Scale" is the largest |logit| of the reference: every error above is relative to the
magnitudes that flow into the product that makes it, and the largest logit is what those
magnitudes add up to. A bug these comparisons guard moves logits by a share of that scale
(a LoRA off by alpha/rank moves them by the adapter's whole effect), which the tests that use
these bounds show with a deliberately broken variant.

Argmax and greedy decoding compare tokens, not floats: where the reference's top two logits
are closer than twice the bound, either side of the tie is a correct answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeft.fidelity import F16_KV_NOISE

FP32_UNIT = 2.0**-24
FP16_UNIT = 2.0**-11

# worst-case reassociation of ~16 chained fp32 products of length ≤ 128 (see above)
FP32_ORDER = 16 * 128 * FP32_UNIT
# one half ulp step (2·FP16_UNIT) in q, k and v through two layers' attention (see above):
# 8·2·FP16_UNIT, the noise the GGUF export's own gate allows for near-ties
FP16_ROUNDING = F16_KV_NOISE
assert FP16_ROUNDING == 8 * 2 * FP16_UNIT
# weights and activations in fp16 (an fp16 ONNX graph): each product rounds both inputs
# (2·FP16_UNIT of Σ|aᵢbᵢ|) and, on CPUs with fp16 arithmetic (ARMv8.2 NEON), may accumulate in
# fp16 too: √K·FP16_UNIT for K = 128 as rounding adds up like a random walk
FP16_COMPUTE = 16 * (2 + 128**0.5) * FP16_UNIT
# weights stored as F16: each of the ~16 chained products has inputs off by ≤ FP16_UNIT, so
# it is off by ≤ FP16_UNIT·Σ|aᵢbᵢ| (no length factor: the rounding is of the terms, not sums)
FP16_WEIGHTS = 16 * FP16_UNIT


def for_model(bound: float, config: dict) -> float:
    """A bound above, derived for the tiny models (two layers, heads 16 wide), for a model with
    ``num_hidden_layers`` layers and heads ``head_dim`` wide:

    - errors add layer by layer: × layers / 2;
    - a rounding error in an attention score is relative to Σ|qᵢkᵢ|, which outgrows the score
      itself like √head_dim for components of independent sign, and softmax turns the score's
      absolute error into a relative error of its weights: × √(head_dim / 16).
    """
    from edgeft.architectures import attention_shape

    layers = max(1.0, config["num_hidden_layers"] / 2)
    return bound * layers * max(1.0, attention_shape(config).head_dim / 16) ** 0.5


def _record(kind: str, measured: float, bound: float) -> None:
    """Append a measured figure and its bound to ``$EDGEFT_RECORD_BOUNDS`` (JSON lines), with
    the test that measured it: how much headroom each bound has on this run's kernel paths
    (benchmarks/kernel_paths.py)."""
    path = os.environ.get("EDGEFT_RECORD_BOUNDS")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        row = {"test": test, "kind": kind, "measured": float(measured), "bound": float(bound)}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def logit_scale(logits) -> float:
    """The largest |logit|: what rounding errors in a forward pass are relative to."""
    return float(np.abs(np.asarray(logits, dtype=np.float64)).max())


def max_relative_gap(actual, expected) -> float:
    """max |actual - expected| over the expected logits' scale."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max()) / logit_scale(expected)


def assert_logits_close(actual, expected, rel: float) -> None:
    """Every logit within ``rel`` of the expected logits' scale."""
    gap = max_relative_gap(actual, expected)
    _record("max Δlogit / scale", gap, rel)
    assert gap <= rel, f"max |Δlogit| is {gap:.3g} of the logits' scale, bound {rel:.3g}"


def assert_bug_caught(actual, expected, rel: float, bug: str) -> None:
    """A deliberately broken variant is more than ten times outside the bound: the bound is
    tight enough to fail the bug it guards."""
    gap = max_relative_gap(actual, expected)
    _record(f"bug: {bug}", gap, rel)
    assert gap > 10 * rel, f"{bug}: max |Δlogit| is only {gap:.3g} of the scale (bound {rel:.3g})"


def top2_margin(logits) -> np.ndarray:
    """Per row: the largest logit minus the second largest."""
    top2 = np.sort(np.asarray(logits, dtype=np.float64), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def assert_argmax_agrees_off_ties(reference, candidate, rel: float) -> None:
    """Same argmax at every row whose reference top-2 margin exceeds twice the bound: two
    logits each off by ``rel·scale`` can swap only when they are closer than that."""
    reference = np.asarray(reference)
    tie = 2 * rel * logit_scale(reference)
    decided = top2_margin(reference) > tie
    agree = reference.argmax(-1) == np.asarray(candidate).argmax(-1)
    rows = np.flatnonzero(decided & ~agree)
    assert rows.size == 0, f"argmax differs at rows {rows.tolist()} (margins above {tie:.3g})"


def assert_chosen_off_ties(token: int, row, rel: float, scale: float) -> None:
    """``token`` is the argmax of ``row``, or tied with it within twice the bound."""
    row = np.asarray(row, dtype=np.float64)
    gap = row.max() - row[token]
    assert gap <= 2 * rel * scale, f"token {token} is {gap:.3g} below the top logit"


def assert_greedy_agrees(
    reference_tokens: Sequence[int],
    candidate_tokens: Sequence[int],
    reference_logits,
    rel: float,
) -> int:
    """A candidate's greedy tokens equal the reference's until the first step where the
    reference's top two are tied within twice the bound; from there the two runs continue
    from other contexts and nothing more is asserted.

    Args:
        reference_tokens: the reference's greedy tokens.
        candidate_tokens: the candidate's greedy tokens from the same prompt.
        reference_logits: the reference's logits at each step, one row per reference token
            (the row that chose it).
        rel: the bound of each logit, relative to the scale.

    Returns:
        How many leading tokens were required to agree.
    """
    rows = np.asarray(reference_logits)
    assert rows.shape[0] == len(reference_tokens), (rows.shape, len(reference_tokens))
    tie = 2 * rel * logit_scale(rows)
    margins = top2_margin(rows)
    decided = next((i for i, m in enumerate(margins) if m <= tie), len(reference_tokens))
    assert list(candidate_tokens[:decided]) == list(reference_tokens[:decided]), (
        f"greedy tokens differ before the first near-tie (step {decided}): "
        f"{list(candidate_tokens[:decided])} vs {list(reference_tokens[:decided])}"
    )
    return decided


def assert_greedy_like(
    reference, prompt: Sequence[int], expected: Sequence[int], tokens: Sequence[int], rel: float
) -> int:
    """:func:`assert_greedy_agrees` with the rows computed by the ``reference`` session that
    generated ``expected`` from ``prompt``."""
    return assert_greedy_agrees(expected, tokens, greedy_rows(reference, prompt, expected), rel)


def assert_parity_within(parity, reference_logits, rel: float) -> None:
    """A :class:`edgeft.parity.Parity` against ``reference_logits`` is what a candidate within
    ``rel`` of their scale gives: KL within :func:`kl_bound`, top-1 lost only at near-ties,
    no logit further than the bound."""
    scale = logit_scale(reference_logits)
    _record("max Δlogit / scale", parity.max_abs_diff / scale, rel)
    _record("mean KL", parity.mean_kl, kl_bound(rel, scale))
    assert parity.max_abs_diff <= rel * scale, (parity.max_abs_diff, rel * scale)
    assert parity.mean_kl <= kl_bound(rel, scale), (parity.mean_kl, kl_bound(rel, scale))
    ties = int((top2_margin(reference_logits) <= 2 * rel * scale).sum())
    assert parity.top1_agreement >= 1 - ties / len(reference_logits), (parity, ties)


def greedy_rows(session, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """The logits that chose each of ``tokens`` after ``prompt``, from one full pass."""
    logits = session.logits(list(prompt) + list(tokens))
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def kl_bound(rel: float, scale: float) -> float:
    """The largest KL(p‖q) two distributions can have when no logit of one is more than
    ε = rel·scale from the other's: KL = log E_p[e^δ] − E_p[δ] ≤ (2ε)²/8 by Hoeffding's lemma,
    for δ = logit differences in [−ε, ε]."""
    return (rel * scale) ** 2 / 2


def perplexity_ratio_bound(rel: float, scale: float) -> float:
    """The largest ratio of two perplexities under the same logit bound: each token's
    log-probability moves by at most 2ε (its logit, and the log-sum-exp by ε)."""
    return float(np.exp(2 * rel * scale))


@dataclass(frozen=True)
class Expected:
    """What a reference session computes on an eval text and a greedy prompt, and how far a
    correct candidate may be from it under a logit bound."""

    ids: list[int]
    logits: np.ndarray
    perplexity: float
    greedy: list[int]
    greedy_rows: np.ndarray  # the reference's logits that chose each greedy token

    @classmethod
    def of(cls, session, eval_text: str, context_length: int | None = None) -> Expected:
        """Measured as :class:`edgeft.fidelity.Reference` measures (same ids, same prompt);
        the session is closed."""
        from edgeft.fidelity import GREEDY_PROMPT, GREEDY_TOKENS, eval_budget
        from edgeft.parity import perplexity
        from edgeft.session import generate

        try:
            ids = session.tokenize(eval_text)[: eval_budget(context_length)]
            logits = np.asarray(session.logits(ids))
            prompt = session.tokenize(GREEDY_PROMPT, chat=True)
            greedy = generate(session, prompt, GREEDY_TOKENS)
            rows = greedy_rows(session, prompt, greedy)
        finally:
            session.close()
        return cls(ids, logits, perplexity(logits, ids), greedy, rows)

    def assert_matched(self, report, rel: float) -> None:
        """A measured report (``parity``, ``perplexity``, ``greedy_first_divergence``, as the
        exporters write them) is what a candidate within ``rel`` of the logits' scale gives:
        KL and perplexity within the bounds that follow, top-1 lost only at near-ties, the
        greedy answer diverging only at or after the first near-tie."""
        scale = logit_scale(self.logits)
        tie = 2 * rel * scale
        assert_parity_within(report.parity, self.logits, rel)
        ratio = report.perplexity / self.perplexity
        bound = perplexity_ratio_bound(rel, scale)
        assert 1 / bound <= ratio <= bound, (report.perplexity, self.perplexity, bound)
        first_tie = next((i for i, m in enumerate(top2_margin(self.greedy_rows)) if m <= tie), None)
        divergence = report.greedy_first_divergence
        assert divergence is None or (first_tie is not None and divergence >= first_tie), (
            f"greedy answer diverges at token {divergence}, first near-tie at {first_tie}"
        )
