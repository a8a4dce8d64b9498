"""The llama.cpp runtime: the embedded SmolLM2 GGUF against its Hugging Face tokenizer, and a
tiny generated GGUF for context limits, chunked evaluation and LoRA adapters."""

from pathlib import Path

import numpy as np
import pytest
from numerics import (
    FP16_ROUNDING,
    assert_chosen_off_ties,
    assert_logits_close,
    logit_scale,
    max_relative_gap,
)

from edgeft.errors import EdgeftError, ModelError
from edgeft.hfcompat import chat_ids
from edgeft.models import default_gguf_path, tokenizer_from_gguf
from edgeft.runtimes import get_runtime
from edgeft.session import Session, generate

pytest.importorskip("llama_cpp")

TEXTS = [
    "Cook chicken to an internal temperature of 165°F (74°C).",
    "def add(a, b):\n    return a + b  # sum\n\n\nprint(add(2, 40))",
    "Numbers: 3.14159, 1,000,000, 2024-11-26, -42, 0x1F, 12345678901234567890",
    "   leading spaces, trailing   \t tabs\t\tand\n\n\n newlines \r\n done  ",
    "Crème brûlée, jalapeño, Smørrebrød, naïve café, Straße",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji 🍳🥚🔥 and 👩‍🍳 with flags 🇫🇷",
    "<|im_start|>user\nHow long do I boil an egg?<|im_end|>\n<|im_start|>assistant\n",
    "Hello , world ! It 's they'll CAN'T",
    "",
]

# llama.cpp's CPU kernels are not batch-invariant: a token decoded alone gets logits a few
# hundredths to tenths of a logit away from the same position inside a batch, so greedy decoding
# may pick the other side of a near-tie that logits() sees.
NEAR_TIE = 0.5


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="module")
def session(gguf_path):
    session = get_runtime("llama.cpp").load(gguf_path, threads=2)
    yield session
    session.close()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    return tokenizer_from_gguf(gguf_path)


def test_registered_and_available():
    runtime = get_runtime("llama.cpp")
    assert runtime.name == "llama.cpp" and runtime.available()


def test_session_follows_the_protocol(session):
    assert isinstance(session, Session)
    assert 2 in session.eos_token_ids  # <|im_end|>
    assert 1 not in session.eos_token_ids  # <|im_start|>
    assert session.n_ctx == 4096  # trained on 8192 tokens, capped


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_equals_hugging_face(session, hf_tokenizer, text):
    ids = session.tokenize(text)
    assert ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert session.detokenize(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", ["How long do I boil an egg?", "<|im_end|> naïve 🍳\n"])
def test_chat_tokenize_equals_apply_chat_template(session, hf_tokenizer, text):
    expected = chat_ids(hf_tokenizer, [{"role": "user", "content": text}])
    ids = session.tokenize(text, chat=True)
    assert ids == list(expected)
    assert session.detokenize(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_detokenize_whole_vocabulary_equals_hugging_face(session, hf_tokenizer):
    """Includes special tokens and pieces longer than llama-cpp-python's 32-byte buffer."""
    ids = list(range(session.n_vocab))
    assert session.detokenize(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_logits_last_row_equals_prefill(session):
    import llama_cpp

    ids = session.tokenize("What temperature is chicken done at?", chat=True)
    logits = session.logits(ids)
    assert logits.shape == (len(ids), session.n_vocab) and logits.dtype == np.float32
    session.prefill(ids)
    after_prefill = np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(session.llm.ctx, -1), shape=(session.n_vocab,)
    )
    # the same ids through logits() and prefill(): one batch each (under n_batch), so the same
    # kernels; allow what another batch split would change, fp16 rounding (numerics.py)
    assert_logits_close(after_prefill, logits[-1], FP16_ROUNDING)
    assert_chosen_off_ties(session.decode_one(), logits[-1], FP16_ROUNDING, logit_scale(logits))


def test_greedy_generation_follows_full_sequence_logits(session):
    prompt = session.tokenize("How long do I boil an egg?", chat=True)
    tokens = generate(session, prompt, 16)
    assert len(tokens) == 16 and not set(tokens) & session.eos_token_ids
    logits = session.logits(prompt + tokens)
    for i, token in enumerate(tokens):
        row = logits[len(prompt) - 1 + i]
        assert row[token] >= row.max() - NEAR_TIE, f"token {i} is not the greedy choice"
    assert session.generate_batch([prompt], 16) == [tokens]


def test_logits_replace_the_prefilled_cache(session):
    session.prefill(session.tokenize("Hi"))
    session.logits(session.tokenize("Hello"))
    with pytest.raises(RuntimeError, match="before prefill"):
        session.decode_one()


def test_chat_reply_stops_at_end_of_turn(session):
    prompt = session.tokenize("What is the capital of France? Answer in one word.", chat=True)
    [reply] = session.generate_batch([prompt], 64)
    assert 0 < len(reply) < 64
    assert "Paris" in session.detokenize(reply)


def test_missing_directory_and_non_gguf_files_are_model_errors(tmp_path):
    runtime = get_runtime("llama.cpp")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00\x01 not a model " * 64)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 64)
    for path, message in [
        (tmp_path / "missing.gguf", "cannot read"),
        (tmp_path, "cannot read"),
        (junk, "not a GGUF file"),
        (broken, "cannot read"),
    ]:
        with pytest.raises(ModelError, match=message) as info:
            runtime.load(path, threads=1)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


# A one-block llama with a byte-level vocabulary, trained context 1024, no chat template.
EMBD, FF, HEADS, KV_HEADS, CTX = 32, 64, 4, 2, 1024
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _write_gguf(path: Path, tensors: dict, configure) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    configure(writer)
    for name, array in tensors.items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = [*SPECIALS, *sorted(ByteLevel.alphabet()), "ab"]
    kv_width = KV_HEADS * EMBD // HEADS
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (len(tokens), EMBD),
        "blk.0.attn_q.weight": (EMBD, EMBD),
        "blk.0.attn_k.weight": (kv_width, EMBD),
        "blk.0.attn_v.weight": (kv_width, EMBD),
        "blk.0.attn_output.weight": (EMBD, EMBD),
        "blk.0.ffn_gate.weight": (FF, EMBD),
        "blk.0.ffn_up.weight": (FF, EMBD),
        "blk.0.ffn_down.weight": (EMBD, FF),
    }
    tensors = {name: rng.normal(0, 0.5, shape) for name, shape in shapes.items()}
    for norm in ["output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"]:
        tensors[f"{norm}.weight"] = np.ones(EMBD)

    def configure(writer):
        writer.add_context_length(CTX)
        writer.add_embedding_length(EMBD)
        writer.add_block_count(1)
        writer.add_feed_forward_length(FF)
        writer.add_head_count(HEADS)
        writer.add_head_count_kv(KV_HEADS)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
        writer.add_token_merges(["a b"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)

    return _write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", tensors, configure)


def _write_lora(path: Path, *, scale: float, width: int = EMBD) -> Path:
    rank = 4
    rng = np.random.default_rng(1)
    tensors = {
        "blk.0.attn_q.weight.lora_a": rng.normal(0, 1, (rank, width)),
        "blk.0.attn_q.weight.lora_b": scale * rng.normal(0, 1, (EMBD, rank)),
    }

    def configure(writer):
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(rank))

    return _write_gguf(path, tensors, configure)


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    session = get_runtime("llama.cpp").load(tiny_gguf, threads=1)
    yield session
    session.close()


def test_default_context_is_the_trained_length_when_shorter(tiny):
    assert tiny.n_ctx == CTX
    assert tiny.eos_token_ids == {0, 2}


def test_logits_span_several_batches(tiny):
    ids = np.random.default_rng(2).integers(3, tiny.n_vocab, CTX).tolist()
    logits = tiny.logits(ids)
    assert logits.shape == (CTX, tiny.n_vocab) and tiny.llm.n_batch < CTX
    # batches of n_batch against one batch of 300: other matmul shapes and F16 KV roundings
    assert_logits_close(tiny.logits(ids[:300]), logits[:300], FP16_ROUNDING)
    tiny.prefill(ids[:700])
    assert_chosen_off_ties(tiny.decode_one(), logits[699], FP16_ROUNDING, logit_scale(logits))


def test_context_limits_are_errors(tiny):
    ids = [5] * CTX
    with pytest.raises(EdgeftError, match="do not fit"):
        tiny.prefill([*ids, 5])
    tiny.prefill(ids)
    with pytest.raises(EdgeftError, match="context of .* is full"):
        tiny.decode_one()
    with pytest.raises(ValueError, match="no tokens"):
        tiny.logits([])


def test_decode_before_prefill_is_an_error(tiny_gguf):
    session = get_runtime("llama.cpp").load(tiny_gguf, threads=1)
    with pytest.raises(RuntimeError, match="before prefill"):
        session.decode_one()
    session.close()


def test_chat_without_a_template_is_a_model_error(tiny, tiny_gguf):
    assert tiny.detokenize(tiny.tokenize("ab <|im_end|>")) == "ab "
    with pytest.raises(ModelError, match="no tokenizer.chat_template") as info:
        tiny.tokenize("hi", chat=True)
    assert str(tiny_gguf) in str(info.value)


def test_lora_adapter_is_applied(tiny, tiny_gguf, tmp_path):
    runtime = get_runtime("llama.cpp")
    ids = tiny.tokenize("abc abc")
    base = tiny.logits(ids)
    for scale, changes in [(0.0, False), (1.0, True)]:
        adapter = _write_lora(tmp_path / f"lora-{scale}.gguf", scale=scale)
        session = runtime.load(tiny_gguf, threads=1, lora_path=adapter)
        # a zero adapter adds exact zeros; a real one moves logits far past fp16 rounding
        assert (max_relative_gap(session.logits(ids), base) > FP16_ROUNDING) == changes
        session.close()


def test_an_adapter_that_does_not_apply_is_a_model_error(tiny_gguf, tmp_path):
    runtime = get_runtime("llama.cpp")
    wrong_shape = _write_lora(tmp_path / "wide.gguf", scale=1.0, width=2 * EMBD)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"junk" * 16)
    for adapter in [wrong_shape, junk]:
        with pytest.raises(ModelError, match="does not apply|not a GGUF file") as info:
            runtime.load(tiny_gguf, threads=1, lora_path=adapter)
        assert str(adapter) in str(info.value)
    with pytest.raises(ModelError, match="not found"):
        runtime.load(tiny_gguf, threads=1, lora_path=tmp_path / "missing.gguf")
