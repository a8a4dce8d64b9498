"""The onnxruntime and onnxruntime-genai runtimes on a tiny llama exported by optimum-onnx:
logits and greedy tokens against torch, the genai tokenizer against Hugging Face's, a KV
cache that keeps decode time flat, and the load errors. The same llama as edgeft's fused graph:
the onnxruntime runtime runs it on one shared, preallocated cache buffer."""

import json
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, tiny_model
from numerics import (
    FP16_COMPUTE,
    FP32_ORDER,
    assert_chosen_off_ties,
    assert_greedy_agrees,
    assert_greedy_like,
    assert_logits_close,
    greedy_rows,
    logit_scale,
)

from edgeft.errors import EdgeftError, ModelError
from edgeft.runtimes import get_runtime
from edgeft.session import Session, generate

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")
pytest.importorskip("optimum.exporters.onnx")

from edgeft.export.onnx.genai import write_genai_config  # noqa: E402

TEXTS = [
    CORPUS[0],
    "One tablespoon equals three teaspoons; one cup is 240 ml.",
    "  leading spaces, tabs\t\tand\n\n newlines — 165°F (74°C) ",
    "Crème brûlée, jalapeño, 日本語 🍳",
    "<|im_start|>user\nHow long do I boil an egg?<|im_end|>\n<|im_start|>assistant\n",
]
QUESTION = "How long do I boil an egg?"


def _export(checkpoint: Path, out: Path, task: str) -> Path:
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():  # torch.onnx tracer chatter
        warnings.simplefilter("ignore")
        main_export(str(checkpoint), output=str(out), task=task, device="cpu", do_validation=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx-checkpoint") / "model"
    return tiny_model(
        "llama", tiny_tokenizer_dir, out, max_position_embeddings=1024, tie_word_embeddings=False
    )


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory) -> Path:
    folder = _export(
        checkpoint, tmp_path_factory.mktemp("onnx") / "fp32", "text-generation-with-past"
    )
    write_genai_config(folder)
    return folder


@pytest.fixture(scope="module")
def fused_folder(checkpoint, tmp_path_factory) -> Path:
    from edgeft.export.onnx.export import _companions, _save
    from edgeft.export.onnx.graph import build_fused_graph

    folder = tmp_path_factory.mktemp("onnx-fused") / "fp32"
    _save(build_fused_graph(checkpoint), folder)
    _companions(checkpoint, folder)
    write_genai_config(folder, share_buffer=True)
    return folder


@pytest.fixture(scope="module")
def torch_session(checkpoint):
    session = get_runtime("torch").load(checkpoint, threads=1)
    yield session
    session.close()


@pytest.fixture(scope="module")
def ort(folder):
    session = get_runtime("onnxruntime").load(folder, threads=1)
    yield session
    session.close()


@pytest.fixture(scope="module")
def genai(folder):
    session = get_runtime("onnxruntime-genai").load(folder, threads=1)
    yield session
    session.close()


@pytest.fixture(scope="module")
def fused(fused_folder):
    session = get_runtime("onnxruntime").load(fused_folder, threads=1)
    yield session
    session.close()


def test_export_folder_holds_what_the_runtimes_read(folder):
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= names
    assert {"chat_template.jinja", "genai_config.json"} <= names


def test_genai_config_is_read_from_the_graph(folder):
    written = json.loads((folder / "genai_config.json").read_text())
    assert written == write_genai_config(folder)
    model, decoder = written["model"], written["model"]["decoder"]
    assert model["type"] == "llama" and model["context_length"] == 1024
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (1, 2, 2)
    assert model["vocab_size"] == 400
    assert decoder["inputs"] == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "position_ids": "position_ids",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    assert decoder["outputs"] == {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    assert (decoder["head_size"], decoder["num_key_value_heads"]) == (16, 2)
    assert (decoder["num_attention_heads"], decoder["num_hidden_layers"]) == (4, 2)
    assert "intra_op_num_threads" not in decoder["session_options"]
    search = written["search"]
    assert search["do_sample"] is False and search["num_beams"] == 1
    assert search["max_length"] == 1024 and search["past_present_share_buffer"] is False


def test_eos_list_and_context_length(folder, tmp_path):
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    generation = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [0]}))
    written = write_genai_config(copy, context_length=128)
    assert written["model"]["eos_token_id"] == [0, 2]  # generation_config, then the tokenizer's
    assert written["model"]["context_length"] == written["search"]["max_length"] == 128
    session = get_runtime("onnxruntime-genai").load(copy, threads=1)
    assert session.eos_token_ids == {0, 2} and session.n_ctx == 128
    assert get_runtime("onnxruntime").load(copy, threads=1).eos_token_ids == {0, 2}
    with pytest.raises(EdgeftError, match="leave no room in the 128-token context"):
        session.prefill([5] * 128)


def test_sessions_follow_the_protocol(ort, genai):
    for session in (ort, genai):
        assert isinstance(session, Session)
        assert session.eos_token_ids == {2}  # <|im_end|>
    assert get_runtime("onnxruntime").name == "onnxruntime"
    assert get_runtime("onnxruntime-genai").name == "onnxruntime-genai"
    assert get_runtime("onnxruntime").available() and get_runtime("onnxruntime-genai").available()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts Linux threads")
@pytest.mark.parametrize("name", ["onnxruntime", "onnxruntime-genai"])
def test_threads_set_the_intra_op_pool(name, folder, ort, genai):
    def threads_added(threads: int) -> int:
        before = len(list(Path("/proc/self/task").iterdir()))
        session = get_runtime(name).load(folder, threads=threads)
        added = len(list(Path("/proc/self/task").iterdir())) - before
        session.close()
        return added

    assert threads_added(4) - threads_added(1) == 3  # the pool's threads besides the caller


def test_onnxruntime_logits_match_torch(ort, torch_session):
    ids = torch_session.tokenize(" ".join(CORPUS[:6]))[:200]
    reference = torch_session.logits(ids)
    logits = ort.logits(ids)
    assert logits.dtype == np.float32 and logits.shape == reference.shape == (len(ids), 400)
    # fp32 both: only summation order differs (measured ~1e-5 of a scale of ~7)
    assert_logits_close(logits, reference, FP32_ORDER)


def test_onnxruntime_greedy_matches_torch(ort, torch_session):
    for prompt in (torch_session.tokenize(QUESTION, chat=True), torch_session.tokenize(CORPUS[1])):
        assert ort.tokenize(QUESTION, chat=True) == torch_session.tokenize(QUESTION, chat=True)
        expected = generate(torch_session, prompt, 20)
        assert len(expected) >= 10
        rows = greedy_rows(torch_session, prompt, expected)
        assert_greedy_agrees(expected, generate(ort, prompt, 20), rows, FP32_ORDER)
        for tokens in ort.generate_batch([prompt, prompt], 20):
            assert_greedy_agrees(expected, tokens, rows, FP32_ORDER)


def test_onnxruntime_decode_matches_its_full_logits(ort):
    prompt = ort.tokenize(QUESTION, chat=True)
    tokens = generate(ort, prompt, 12)
    full = ort.logits(prompt + tokens)
    # one token at a time against one pass over all: other shapes, other summation orders
    for i, token in enumerate(tokens):
        assert_chosen_off_ties(token, full[len(prompt) - 1 + i], FP32_ORDER, logit_scale(full))


def test_genai_generates_what_onnxruntime_generates(ort, genai):
    prompt = genai.tokenize(QUESTION, chat=True)
    assert prompt == ort.tokenize(QUESTION, chat=True)
    expected = generate(ort, prompt, 20)
    for tokens in (
        generate(genai, prompt, 20),
        *genai.generate_batch([prompt], 20),
        generate(genai, prompt, 20),  # a second prefill starts over
    ):
        assert_greedy_like(ort, prompt, expected, tokens, FP32_ORDER)


def test_genai_prompt_in_pieces_generates_the_same(ort, genai):
    """A prompt fed a few tokens at a time (as big vocabularies' prompts are, to bound the
    logits genai computes for every position of a piece) continues as one fed whole."""
    from edgeft.runtimes.ortgenai import prefill_chunk

    prompt = genai.tokenize(QUESTION, chat=True)
    assert genai.prefill_chunk == prefill_chunk(400) == 512 > len(prompt)
    expected = generate(genai, prompt, 12)
    genai.prefill_chunk = 5
    try:
        assert len(prompt) > 2 * genai.prefill_chunk
        assert_greedy_like(ort, prompt, expected, generate(genai, prompt, 12), FP32_ORDER)
    finally:
        genai.prefill_chunk = prefill_chunk(400)


@pytest.mark.parametrize(
    ("vocab", "tokens"), [(49152, 128), (128256, 64), (262144, 64), (32000, 256), (0, 512)]
)
def test_prefill_pieces_bound_their_logits(vocab, tokens):
    from edgeft.runtimes.ortgenai import PREFILL_LOGITS_BYTES, prefill_chunk

    assert prefill_chunk(vocab) == tokens
    assert tokens == 64 or tokens * 4 * vocab <= PREFILL_LOGITS_BYTES


def test_genai_logits_cover_every_position(ort, genai):
    ids = ort.tokenize(CORPUS[0] + " " + CORPUS[2])
    logits = genai.logits(ids)
    assert logits.dtype == np.float32 and logits.shape == (len(ids), 400)
    assert_logits_close(logits, ort.logits(ids), FP32_ORDER)


@pytest.mark.parametrize("text", TEXTS)
def test_genai_tokenizer_matches_hugging_face(text, ort, genai):
    assert genai.tokenize(text) == ort.tokenize(text)
    assert genai.tokenize(text, chat=True) == ort.tokenize(text, chat=True)
    assert genai.detokenize(ort.tokenize(text)) == ort.detokenize(ort.tokenize(text))


def test_genai_refuses_to_decode_past_an_end_token(genai):
    genai.prefill(genai.tokenize(QUESTION, chat=True))
    genai._generator.set_logits(np.eye(400, dtype=np.float32)[2][None])  # force <|im_end|>
    assert genai.decode_one() == 2
    with pytest.raises(EdgeftError, match="ended the sequence at end token 2"):
        genai.decode_one()


def test_external_data_and_fp16_graphs(folder, ort, tmp_path):
    import onnx

    ids = ort.tokenize(CORPUS[3])
    prompt = ort.tokenize(QUESTION, chat=True)
    external = Path(shutil.copytree(folder, tmp_path / "external"))
    onnx.save_model(
        onnx.load(str(folder / "model.onnx")),
        str(external / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    write_genai_config(external)
    for name in ("onnxruntime", "onnxruntime-genai"):
        session = get_runtime(name).load(external, threads=1)
        # where the weights live changes no arithmetic
        assert_logits_close(session.logits(ids), ort.logits(ids), FP32_ORDER)

    float16 = pytest.importorskip("onnxruntime.transformers.float16")
    half = Path(shutil.copytree(folder, tmp_path / "fp16"))
    graph = float16.convert_float_to_float16(onnx.load(str(folder / "model.onnx")))
    onnx.save_model(graph, str(half / "model.onnx"))
    write_genai_config(half)
    expected = generate(ort, prompt, 10)
    for name in ("onnxruntime", "onnxruntime-genai"):
        session = get_runtime(name).load(half, threads=1)
        logits = session.logits(ids)
        assert logits.dtype == np.float32
        assert_logits_close(logits, ort.logits(ids), FP16_COMPUTE)  # measured 0.013 of ~7
        assert_greedy_like(ort, prompt, expected, generate(session, prompt, 10), FP16_COMPUTE)
    for graph_folder, dtype in ((folder, np.float32), (half, np.float16)):
        cache = _prefilled_cache(graph_folder)
        assert len(cache) == 4  # 2 layers x key, value
        assert {(v.dtype, v.shape) for v in cache.values()} == {(np.dtype(dtype), (1, 2, 3, 16))}


def _prefilled_cache(folder: Path) -> dict:
    """The KV cache an onnxruntime session holds after a prefill, as numpy arrays."""
    session = get_runtime("onnxruntime").load(folder, threads=1)
    session.prefill([5, 6, 7])
    return {name: value.numpy() for name, value in session._past.items()}


def test_a_full_context_is_refused(ort, genai):
    prompt = np.random.default_rng(1).integers(3, 400, 1020).tolist()
    for session in (ort, genai):
        session.prefill(prompt)
        tokens = [session.decode_one() for _ in range(4)]
        assert not set(tokens) & session.eos_token_ids
        with pytest.raises(EdgeftError, match="1024-token context of .* is full"):
            session.decode_one()
    with pytest.raises(EdgeftError, match="1025 tokens exceed the 1024-token context"):
        ort.logits(prompt + [5] * 5)


def _median_decode_ms(session, prompt: list[int], steps: int = 40) -> float:
    session.prefill(prompt)
    for _ in range(3):  # warm-up
        session.decode_one()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        session.decode_one()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def test_decode_time_is_flat_in_the_prompt_length(ort):
    """With the KV cache each step runs one token; recomputing a 512-token prompt per step
    would cost ~50x a 16-token one (a full 512-token forward takes ~15 ms, a step ~0.3 ms)."""
    rng = np.random.default_rng(0)
    short, long = (rng.integers(3, 400, n).tolist() for n in (16, 512))
    _median_decode_ms(ort, long, steps=5)  # warm-up of the long shapes
    short_ms = min(_median_decode_ms(ort, short) for _ in range(2))
    long_ms = min(_median_decode_ms(ort, long) for _ in range(2))
    assert long_ms / short_ms < 2.5, (short_ms, long_ms)


def test_missing_folder_and_model(tmp_path):
    for name in ("onnxruntime", "onnxruntime-genai"):
        with pytest.raises(ModelError, match="not found"):
            get_runtime(name).load(tmp_path / "nope", threads=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no model.onnx"):
        get_runtime("onnxruntime").load(tmp_path / "empty", threads=1)
    with pytest.raises(ModelError, match="has no genai_config.json"):
        get_runtime("onnxruntime-genai").load(tmp_path / "empty", threads=1)
    with pytest.raises(ModelError, match="model.onnx not found"):
        write_genai_config(tmp_path / "empty")


def test_a_damaged_graph_is_refused(folder, tmp_path):
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    (copy / "model.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        get_runtime("onnxruntime").load(copy, threads=1)
    with pytest.raises(ModelError, match="onnxruntime-genai cannot load"):
        get_runtime("onnxruntime-genai").load(copy, threads=1)


def test_genai_chat_needs_a_chat_template(folder, tmp_path):
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    (copy / "chat_template.jinja").unlink()
    session = get_runtime("onnxruntime-genai").load(copy, threads=1)
    with pytest.raises(ModelError, match="cannot render the chat template"):
        session.tokenize(QUESTION, chat=True)


def test_an_export_without_kv_cache_is_refused(checkpoint, tmp_path):
    folder = _export(checkpoint, tmp_path / "nopast", "text-generation")
    with pytest.raises(ModelError, match="exported without a KV cache"):
        get_runtime("onnxruntime").load(folder, threads=1)
    with pytest.raises(ModelError, match="exported without a KV cache"):
        get_runtime("onnxruntime").load(folder / "model.onnx", threads=1)
    with pytest.raises(ModelError, match="exported without a KV cache"):
        write_genai_config(folder)


def test_fused_graph_shares_one_cache_buffer(fused, ort, fused_folder):
    assert fused.share_buffer and not ort.share_buffer
    prompt = np.random.default_rng(4).integers(3, 400, 40).tolist()
    fused.prefill(prompt)
    for _ in range(5):
        fused.decode_one()
    buffers = dict(fused._buffers)
    assert len(buffers) == 4  # 2 layers x key, value
    assert {b.shape for b in buffers.values()} == {(1, 2, 256, 16)}
    assert {b.dtype for b in buffers.values()} == {np.dtype(np.float32)}
    # the positions written in place are the cache the growing path returns
    growing = get_runtime("onnxruntime").load(fused_folder, threads=1)
    growing.share_buffer = False
    growing.prefill(prompt)
    for _ in range(5):
        growing.decode_one()
    for name, value in growing._past.items():
        assert value.shape() == [1, 2, 45, 16]
        # the same projections, written in place or returned: fp32 order at most
        assert_logits_close(buffers[name][:, :, :45], value.numpy(), FP32_ORDER)
    fused.close()
    assert not fused._buffers


def test_shared_buffer_detection(folder, fused_folder, monkeypatch):
    from edgeft.runtimes.onnxrt import _shares_buffer

    assert _shares_buffer(fused_folder / "model.onnx")  # GroupQueryAttention nodes
    assert not _shares_buffer(folder / "model.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # no onnx package: genai_config.json says
    assert _shares_buffer(fused_folder / "model.onnx")
    assert not _shares_buffer(folder / "model.onnx")


def test_fused_logits_match_torch(fused, torch_session):
    ids = torch_session.tokenize(" ".join(CORPUS[:6]))[:200]
    reference = torch_session.logits(ids)
    assert_logits_close(fused.logits(ids), reference, FP32_ORDER)
    # the shared buffer's prefill, from position 0 of a buffer a longer prompt filled first
    fused.prefill(ids + ids)
    shared = fused._run_shared(ids, 0)[0]
    assert_logits_close(shared, reference, FP32_ORDER)


def test_fused_greedy_matches_torch_and_genai(fused, fused_folder, torch_session):
    genai = get_runtime("onnxruntime-genai").load(fused_folder, threads=1)
    rng = np.random.default_rng(2)
    prompts = [
        torch_session.tokenize(QUESTION, chat=True),
        torch_session.tokenize(CORPUS[1]),
        rng.integers(3, 400, 250).tolist(),  # decode grows the buffer past 256 positions
    ]
    for prompt in prompts:
        expected = generate(torch_session, prompt, 20)
        assert len(expected) >= 10
        rows = greedy_rows(torch_session, prompt, expected)
        assert_greedy_agrees(expected, generate(fused, prompt, 20), rows, FP32_ORDER)
        assert_greedy_agrees(expected, generate(genai, prompt, 20), rows, FP32_ORDER)
    assert fused._buffers["past_key_values.0.key"].shape[2] == 512


def test_fused_prefill_starts_over(fused, fused_folder):
    rng = np.random.default_rng(3)
    long, short = rng.integers(3, 400, 300).tolist(), fused.tokenize(QUESTION, chat=True)
    fresh = get_runtime("onnxruntime").load(fused_folder, threads=1)
    expected = {len(p): generate(fresh, p, 20) for p in (short, long)}
    rows = {len(p): greedy_rows(fresh, p, expected[len(p)]) for p in (short, long)}
    fresh.close()
    # stale positions of the longer prompt stay in the buffer behind the shorter one
    for first, second in ((long, short), (short, long), (short, short)):
        generate(fused, first, 20)
        tokens = generate(fused, second, 20)
        assert_greedy_agrees(expected[len(second)], tokens, rows[len(second)], FP32_ORDER)


def test_fused_full_context(fused):
    prompt = np.random.default_rng(1).integers(3, 400, 1020).tolist()
    fused.prefill(prompt)
    for _ in range(4):
        fused.decode_one()
    assert fused._buffers["past_key_values.0.key"].shape[2] == 1024  # capped at the context
    with pytest.raises(EdgeftError, match="1024-token context of .* is full"):
        fused.decode_one()


def test_fused_decode_time_is_flat_in_the_prompt_length(fused):
    rng = np.random.default_rng(0)
    short, long = (rng.integers(3, 400, n).tolist() for n in (16, 400))
    _median_decode_ms(fused, long, steps=5)  # warm-up of the long shapes
    short_ms = min(_median_decode_ms(fused, short) for _ in range(2))
    long_ms = min(_median_decode_ms(fused, long) for _ in range(2))
    assert long_ms / short_ms < 2.5, (short_ms, long_ms)
