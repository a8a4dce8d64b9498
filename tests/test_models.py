"""The default model's tokenizer, rebuilt from its GGUF metadata, against llama.cpp."""

import pytest

from edgeft.hfcompat import chat_ids
from edgeft.models import default_gguf_path, tokenizer_from_gguf

CORPUS = [
    "Cook chicken to an internal temperature of 165°F (74°C).",
    "def add(a, b):\n    return a + b  # sum\n\n\nprint(add(2, 40))",
    "Numbers: 3.14159, 1,000,000, 2024-11-26, -42, 1e-5, 0x1F, 12345678901234567890",
    "   leading spaces, trailing   \t tabs\t\tand\n\n\n newlines \r\n done  ",
    "Crème brûlée, jalapeño, Smørrebrød, naïve café, Ærø, Straße",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji 🍳🥚🔥 and 👩‍🍳 with flags 🇫🇷 and ZWJ",
    "<|im_start|>user\nHow long do I boil an egg?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>literal <|im_end|>mid-text<|im_start|>",
    "It's they'll we've I'm you'd CAN'T don't",
    "a" * 300 + " " + "ab" * 50,
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def gguf_path():
    return default_gguf_path()


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return tokenizer_from_gguf(gguf_path)


def test_special_tokens_are_fixed(tokenizer):
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]
    assert tokenizer.backend_tokenizer.model.byte_fallback is False
    assert type(tokenizer.backend_tokenizer.decoder).__name__ == "ByteLevel"


def test_chat_template_renders_like_smollm2_with_a_single_im_start(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = chat_ids(tokenizer, messages)
    assert ids[0] == 1 and ids[1] != 1
    assert ids.count(1) == 3  # one <|im_start|> per turn, no extra bos


@pytest.fixture(scope="module")
def llama_vocab(gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    yield vocab
    vocab.close()


@pytest.mark.parametrize("text", CORPUS)
def test_token_ids_equal_llama_cpp(tokenizer, llama_vocab, text):
    expected = llama_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.decode(expected) == text


def test_default_model_converts_and_stops_at_im_end(tmp_path, monkeypatch):
    """Converts the embedded GGUF into a fresh cache (seconds) and generates."""
    from edgeft.models import resolve_base
    from edgeft.runtimes import get_runtime
    from edgeft.session import generate

    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path))

    base = resolve_base(None)
    session = get_runtime("torch").load(base.path, threads=2)
    assert session.eos_token_ids == {2}
    prompt = session.tokenize("What is the capital of France? Answer in one word.", chat=True)
    reply = generate(session, prompt, max_new_tokens=64)
    assert 0 < len(reply) < 64  # stopped at <|im_end|>, not at the token limit
    assert "Paris" in session.detokenize(reply)
    assert base.path.parent == tmp_path / "models"
    assert (base.path / "edgeft.json").is_file() and resolve_base(None).path == base.path


def test_training_rows_start_with_one_im_start_and_learn_im_end(tokenizer):
    from edgeft.data import IGNORE_INDEX, encode

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    example = encode(tokenizer, messages, max_length=128, where="t:1")
    assert example.input_ids[0] == 1 and example.input_ids[1] != 1
    learned = [t for t in example.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Hello!<|im_end|>\n"


def _write_vocab_gguf(path, model, pre):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("model", "pre"), [("llama", "default"), ("gpt2", "qwen2")])
def test_a_tokenizer_that_cannot_be_rebuilt_exactly_is_an_error(tmp_path, model, pre):
    from edgeft.errors import ModelError

    path = _write_vocab_gguf(tmp_path / "v.gguf", model, pre)
    with pytest.raises(ModelError, match=f"tokenizer '{model}' with pre-tokenizer '{pre}'"):
        tokenizer_from_gguf(path)


def test_a_small_gpt2_vocab_is_rebuilt(tmp_path):
    path = _write_vocab_gguf(tmp_path / "v.gguf", "gpt2", "gpt2")
    tokenizer = tokenizer_from_gguf(path)
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [2]
    assert tokenizer.eos_token == "ab" and tokenizer.pad_token == "ab"


def test_resolve_base_errors(tmp_path):
    from edgeft.errors import ModelError
    from edgeft.models import resolve_base

    with pytest.raises(ModelError, match="not found: pass a local directory"):
        resolve_base(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="not a Hugging Face checkpoint"):
        resolve_base(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ModelError, match="never unpickles"):
        resolve_base(str(tmp_path))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from edgeft.models import cache_dir

    monkeypatch.delenv("EDGEFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "edgeft"
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
