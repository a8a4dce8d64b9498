"""Calibration text for the quantizers that need it (GPTQ, the GGUF importance matrix, the
int8 KV cache's scales): where it comes from, and how much of it a model gets.

Without ``--calibration`` a merged checkpoint calibrates on the data it was fine-tuned on
(found through its provenance), else on text sampled from itself, else on a shipped text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from edgeft._io import sha256_file
from edgeft.errors import EdgeftError
from edgeft.provenance import MergeRecord, TrainRecord, find_record
from edgeft.streaming import should_stream

logger = logging.getLogger(__name__)

SAMPLED = "text sampled from the model"
SHIPPED = "a shipped mixed-domain text"

# Calibration tokens: 16k of them bring the int4 folder closer to the checkpoint than 4k
# (benchmarks/README.md#choosing-the-int4-recipe).
CALIBRATION_MAX_TOKENS = 16384
CHUNK_TOKENS = 512


def calibration_ids(
    model_dir: Path, texts: Sequence[str], limit: int = CALIBRATION_MAX_TOKENS
) -> list[list[int]]:
    """``texts`` tokenized and cut into chunks of :data:`CHUNK_TOKENS`, up to ``limit`` tokens.

    Raises:
        EdgeftError: fewer than 64 tokens in all.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= limit:
            break
    ids = ids[:limit]
    if len(ids) < 64:
        raise EdgeftError(f"the calibration text has {len(ids)} tokens; give at least 64")
    return [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]


# Without calibration data, GPTQ calibrates on text sampled from the checkpoint itself: closer
# to the checkpoint than a short shipped mixed-domain text, or round-to-nearest
# (benchmarks/README.md#choosing-the-int4-recipe).
SAMPLE_BATCH = 16
SAMPLE_SEED = 0


def sampled_texts(model_dir: Path, tokens: int = CALIBRATION_MAX_TOKENS) -> list[str] | None:
    """About ``tokens`` tokens sampled from the checkpoint (top-k 50, top-p 0.95, a fixed
    seed), in sequences of up to :data:`CHUNK_TOKENS`; ``None`` when the tokenizer has no token
    to start from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        return None
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    ).eval()
    context = getattr(model.config, "max_position_embeddings", None) or CHUNK_TOKENS + 1
    length = min(CHUNK_TOKENS, context - 1)
    sequences = -(-tokens // length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    texts: list[str] = []
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(SAMPLE_SEED)
        for first in range(0, sequences, SAMPLE_BATCH):
            prompt = torch.full((min(SAMPLE_BATCH, sequences - first), 1), start)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                top_p=0.95,
                temperature=1.0,
                top_k=50,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=pad,
            )
            texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    return texts


# GPTQ's cost is about a forward pass over its calibration tokens (twice: statistics, then
# the rounded layer's outputs), so it grows with parameters × tokens. Above this product
# (16k tokens of a 400M model) the tokens shrink with the model, down to
# MIN_CALIBRATION_TOKENS: calibration time stays about flat per parameter.
CALIBRATION_TOKEN_PARAMS = CALIBRATION_MAX_TOKENS * 400_000_000
MIN_CALIBRATION_TOKENS = 2048


def calibration_budget(params: int) -> int:
    """Calibration tokens for a model of ``params`` parameters (whole chunks)."""
    tokens = CALIBRATION_TOKEN_PARAMS // max(params, 1)
    tokens = max(MIN_CALIBRATION_TOKENS, min(CALIBRATION_MAX_TOKENS, tokens))
    return tokens // CHUNK_TOKENS * CHUNK_TOKENS


def fine_tuning_data(model: Path) -> Path | None:
    """The data file a merged checkpoint was fine-tuned on, found through its provenance
    (merge record → adapter record), when it is still there with the recorded sha256."""
    merge = find_record(model)
    if not isinstance(merge, MergeRecord):
        return None
    adapter = find_record(Path(merge.inputs.adapter.path))
    if not isinstance(adapter, TrainRecord):
        return None
    data = adapter.inputs.data
    if Path(data.path).is_file() and sha256_file(Path(data.path)) == data.sha256:
        return Path(data.path)
    return None


def calibration_texts(model: Path, calibration: Path | None) -> tuple[list[str], str]:
    """Texts for GPTQ's statistics, and where they came from.

    ``calibration`` is a UTF-8 text or a JSONL dataset (rendered through the chat template).
    Without it: the data the checkpoint was fine-tuned on, when its provenance names a file
    that still has the recorded sha256; else text sampled from the checkpoint itself
    (:func:`sampled_texts`); else, when its tokenizer has no token
    to start from, a shipped mixed-domain text.
    """
    from importlib import resources

    if calibration is None:
        calibration = fine_tuning_data(model)
    if calibration is None and not should_stream(model):
        from edgeft.weights import checkpoint_params

        logger.info(
            "no calibration data (no --calibration, no fine-tuning data in the provenance): "
            "sampling calibration text from the model itself"
        )
        # as many tokens as GPTQ calibrates on: sampling costs a forward pass per token
        texts = sampled_texts(model, calibration_budget(checkpoint_params(model)))
        if texts:
            return texts, SAMPLED
    if calibration is None:  # sampling needs the model loaded whole
        text = resources.files("edgeft").joinpath("assets/eval/calibration.txt").read_text("utf-8")
        return [text], SHIPPED
    calibration = Path(calibration)
    if calibration.suffix == ".jsonl":
        from transformers import AutoTokenizer

        from edgeft.data import iter_rows, row_to_messages

        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
        texts = []
        for where, row in iter_rows(calibration):
            if isinstance(row, Exception):
                raise EdgeftError(f"{where}: not valid JSON ({row})")
            messages = row_to_messages(row, where)
            if tokenizer.chat_template:
                texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append("\n".join(m["content"] for m in messages))
        return texts, str(calibration)
    try:
        return [calibration.read_text(encoding="utf-8")], str(calibration)
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeftError(f"{calibration}: cannot read the calibration text: {exc}") from exc
