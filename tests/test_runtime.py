"""The torch reference runtime: KV-cache decoding equals full recomputation."""

import numpy as np

from edgeft.runtimes import Session, generate, get_runtime


def test_kv_cache_decode_matches_full_logits(tiny_llama):
    session = get_runtime("torch").load(tiny_llama, threads=1)
    assert isinstance(session, Session)
    prompt = session.tokenize("How long do I boil an egg?", chat=True)
    assert prompt[-3:] != prompt[:3]
    tokens = generate(session, prompt, max_new_tokens=6)
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
