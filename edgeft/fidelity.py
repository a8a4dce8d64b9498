"""Measuring an exported artifact against the model it came from, through the runtimes.

A :class:`Reference` holds what the source model (usually the checkpoint in PyTorch fp32)
produces on an eval text and a chat prompt; :func:`measure` runs the same token ids through a
candidate session and compares: logits (KL, top-1, max difference), perplexity, and where a
greedy answer first diverges. Every exporter uses this, so their figures mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from edgeft.errors import EdgeftError, ModelError
from edgeft.isolate import free_memory
from edgeft.parity import (
    Parity,
    compare_logits,
    first_divergence,
    perplexity,
    top1_off_ties,
)

EVAL_MAX_TOKENS = 512
GREEDY_TOKENS = 32
# A streamed reference (a checkpoint larger than memory comfortably holds) reads every weight
# again for each generated token: its greedy answer is cut to this many tokens (an 8B model's
# 32 would be half an hour of reading on 2 cores), still enough to see an early divergence.
STREAMED_GREEDY_TOKENS = 8
GREEDY_PROMPT = "Give me three tips for cooking rice well."


def default_eval_text() -> str:
    """The shipped eval text: a ~260-token recipe paragraph."""
    return resources.files("edgeft").joinpath("assets/eval/cooking.txt").read_text("utf-8")


def eval_budget(context_length: int | None) -> int:
    """Eval tokens that fit a model's trained context with room for the greedy check."""
    if not context_length:
        return EVAL_MAX_TOKENS
    return max(2, min(EVAL_MAX_TOKENS, int(context_length) - GREEDY_TOKENS))


class Reference:
    """What candidates are measured against: a session's logits on the eval text and its
    greedy answer to a chat prompt. The session is closed once this is built.

    ``context_length`` (the model's, or :func:`edgeft.architectures.uniform_context`) bounds
    the eval tokens (:func:`eval_budget`) and the context candidates are loaded with. A
    streamed session's greedy answer is :data:`STREAMED_GREEDY_TOKENS` long
    (``greedy_tokens``); candidates are measured over as many.
    """

    def __init__(self, session, eval_text: str, context_length: int | None = None) -> None:
        from edgeft.session import generate

        self.context_length = context_length
        try:
            self.eval_ids = session.tokenize(eval_text)[: eval_budget(context_length)]
            if len(self.eval_ids) < 2:
                raise EdgeftError("the eval text has fewer than 2 tokens; pass a longer text")
            self.logits = session.logits(self.eval_ids)
            self.perplexity = perplexity(self.logits, self.eval_ids)
            try:
                self.prompt_ids = session.tokenize(GREEDY_PROMPT, chat=True)
            except (ModelError, ValueError):  # no chat template: continue the eval text
                self.prompt_ids = self.eval_ids[:32]
            streamed = getattr(session, "streamed", False)
            self.greedy_tokens = STREAMED_GREEDY_TOKENS if streamed else GREEDY_TOKENS
            self.greedy = generate(session, self.prompt_ids, self.greedy_tokens)
        finally:
            session.close()
            free_memory()  # a model loaded whole: candidates are measured after it


@dataclass(frozen=True)
class Measurement:
    parity: Parity
    perplexity: float
    greedy: list[int]
    greedy_first_divergence: int | None
    # top-1 agreement counting a near-tie of the reference as agreement (see measure)
    top1_off_ties: float


def measure(session, reference: Reference, *, noise: float = 0.0) -> Measurement:
    """Run the reference's token ids through ``session`` (left open) and compare.

    Args:
        session: the candidate.
        reference: what it is measured against.
        noise: how far a correct candidate's logits may be from the reference's, relative to
            their largest magnitude (e.g. :data:`F16_KV_NOISE`); where the reference's top
            logits are closer than twice that, the candidate may pick either, and
            ``top1_off_ties`` counts it as agreeing.
    """
    from edgeft.session import generate

    logits = session.logits(reference.eval_ids)
    greedy = generate(session, reference.prompt_ids, reference.greedy_tokens)
    return Measurement(
        parity=compare_logits(reference.logits, logits),
        perplexity=perplexity(logits, reference.eval_ids),
        greedy=greedy,
        greedy_first_divergence=first_divergence(reference.greedy, greedy),
        top1_off_ties=top1_off_ties(reference.logits, logits, noise),
    )


# llama.cpp keeps K and V in F16 and rounds q to F16 for q·k: two correct computations in
# another order (another CPU's SIMD width, a LoRA applied at load time) can land on
# neighbouring halves, up to ~2⁻⁷ of the logits' largest magnitude (tests/numerics.py).
F16_KV_NOISE = 2.0**-7


# Texts on which a runtime's token ids must equal the Hugging Face tokenizer's (llama.cpp's
# vocabulary, onnxruntime-genai's tokenizer).
TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Preheat the oven to 220°C (425°F); roast for 25–30 minutes.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # 5\n",
    "if (x >= 10 && y != -3.14e-2) { z[i] += 0x1F; }",
    "Numbers: 0 7 42 1234 56789 3.14159 1,000,000 2026-11-26 12:30:45",
    "   leading spaces, trailing spaces   \n\n\n\ttabs\t\tand\r\nwindows lines  ",
    "Crème brûlée, jalapeño, façade, naïve, Ångström, Øl, straße, İstanbul",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 🍕🍔🌮 👩‍🍳 👍🏽 ❤️ ✨",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם.",
    "MixedCASE camelCase snake_case kebab-case SCREAMING_CASE it's we'll they'd I'M",
    "https://example.com/path?query=1&b=two#frag user@example.org",
    "a" * 40 + " " + "ab" * 20 + " " + "!" * 12,
    "",
    " ",
    "\n",
)
