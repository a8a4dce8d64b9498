"""The torch reference runtime: KV-cache decoding equals full recomputation."""

import numpy as np
import pytest

from edgeft.runtimes import get_runtime
from edgeft.session import Session, generate


def test_kv_cache_decode_matches_full_logits(tiny_llama):
    session = get_runtime("torch").load(tiny_llama, threads=1)
    assert isinstance(session, Session)
    question = session.tokenize("How long do I boil an egg?")
    prompt = session.tokenize("How long do I boil an egg?", chat=True)
    # the chat template wraps the question's own tokens in turn markers
    starts = [i for i in range(len(prompt)) if prompt[i : i + len(question)] == question]
    assert starts and len(prompt) > len(question)
    tokens = generate(session, prompt, max_new_tokens=6)
    assert tokens  # the checks below need generated tokens to check
    full = session.logits(prompt + tokens)
    # each generated token is the argmax of the full-sequence logits at its position
    expected = [int(np.argmax(full[len(prompt) - 1 + i])) for i in range(len(tokens))]
    assert tokens == expected[: len(tokens)]
    assert full.shape == (len(prompt) + len(tokens), len(session.tokenizer))


class ScriptedSession:
    """Decodes a fixed token script: checks the generation loop, not a model."""

    eos_token_ids = frozenset({2})

    def __init__(self, script):
        self.script = list(script)
        self.prefilled = None

    def prefill(self, token_ids):
        self.prefilled = list(token_ids)

    def decode_one(self):
        return self.script.pop(0)


def test_generation_stops_at_eos_and_drops_it():
    session = ScriptedSession([5, 6, 2, 7])
    assert generate(session, [1, 9], max_new_tokens=10) == [5, 6]
    assert session.prefilled == [1, 9]
    assert generate(ScriptedSession([5, 6, 7, 8]), [1], max_new_tokens=3) == [5, 6, 7]


@pytest.mark.parametrize(
    "module, name",
    [
        ("pytorch", "TorchSession"),
        ("pytorch", "LoadedTorchSession"),
        ("onnxrt", "OnnxSession"),
        ("ortgenai", "GenaiSession"),
        ("llamacpp", "LlamaCppSession"),
    ],
)
def test_sessions_declare_the_optional_capabilities_they_have(module, name):
    """A session's ``capabilities`` name exactly the optional methods it has, so callers ask
    ``supports`` instead of probing."""
    import importlib

    from edgeft.session import ADAPTERS, BATCH, CAPABILITIES

    session = getattr(importlib.import_module(f"edgeft.runtimes.{module}"), name)
    assert session.capabilities <= CAPABILITIES
    for capability in (BATCH, ADAPTERS):
        assert callable(getattr(session, capability, None)) == (capability in session.capabilities)


def test_formats_table_is_what_bench_package_and_inspect_read(tmp_path):
    from edgeft.formats import BY_NAME, FORMATS, detect
    from edgeft.runtimes import RUNTIMES

    for fmt in FORMATS:
        assert set(fmt.runtimes) <= set(RUNTIMES)
        assert fmt.packaged_with is None or fmt.packaged_with in fmt.runtimes
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    onnx = tmp_path / "int4"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"")
    (onnx / "config.json").write_text("{}")  # an ONNX folder carries a config too
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "config.json").write_text("{}")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (tmp_path / "a.onnx_adapter").write_bytes(b"")
    found = {
        p.name: detect(p).name
        for p in (tmp_path / "model.gguf", onnx, adapter, hf, tmp_path / "a.onnx_adapter")
    }
    assert found == {
        "model.gguf": "gguf",
        "int4": "onnx",
        "adapter": "adapter",
        "hf": "hf",
        "a.onnx_adapter": "onnx_adapter",
    }
    assert detect(tmp_path / "notes.txt") is None
    assert [f.name for f in FORMATS if f.packaged_with] == ["gguf", "onnx"]
    assert BY_NAME["onnx"].runtimes[0] == "onnxruntime-genai"


def test_a_timed_round_decodes_through_end_tokens_where_the_session_can():
    """The harness's one timed round (what benchmark scripts call for paired rounds): a
    session that stops at end tokens is told to decode on for the round, then reset."""
    from edgeft.bench.worker import timed_round
    from edgeft.session import MIN_NEW_TOKENS

    class Stopping:
        capabilities = frozenset({MIN_NEW_TOKENS})
        min_new_tokens = 0

        def __init__(self):
            self.seen = []

        def prefill(self, ids):
            self.seen.append(self.min_new_tokens)

        def decode_one(self):
            assert self.min_new_tokens > 0, "decoding past an end token unmasked"
            return 2

    session = Stopping()
    prefill, decode = timed_round(session, [1, 2, 3], new_tokens=5)
    assert session.seen == [6] and session.min_new_tokens == 0
    assert prefill > 0 and decode > 0
