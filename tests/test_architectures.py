"""Today's edge families from the architecture table (Llama 3.2, Qwen3, Gemma 3, Phi-3 /
Phi-4-mini, SmolLM3): each a tiny checkpoint with every quirk of its architecture switched on,
through every hop of the CLI; each quirk shown to matter by switching it off; the refusals."""

import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import CORPUS, FAMILIES, facts_rows, family_model, write_jsonl
from numerics import (
    FP16_ROUNDING,
    FP16_WEIGHTS,
    FP32_ORDER,
    Expected,
    assert_bug_caught,
    assert_logits_close,
    for_model,
)

from edgeft.architectures import (
    ARCHITECTURES,
    architecture_of,
    attention_shape,
    inverse_frequencies,
    rope_kind,
    uniform_context,
)
from edgeft.cli import main
from edgeft.errors import ModelError
from edgeft.hfcompat import model_config
from edgeft.parity import Parity
from edgeft.runtimes import get_runtime

EVAL = " ".join(CORPUS[:6])
# Longer than Phi-3's original context (256): its LongRoPE long factors are in use.
LONG_IDS = 300


def _cli(*args) -> None:
    assert main(["--quiet", *map(str, args)]) == 0, args


def _config(model: Path) -> dict:
    """The model's config in the one layout edgeft reads (either transformers' file)."""
    return model_config(model)


def _record(folder: Path) -> dict:
    return json.loads((folder / "edgeft.json").read_text())


def _report(row: dict) -> SimpleNamespace:
    """A file or folder row of an ``edgeft.json`` as :meth:`Expected.assert_matched` reads it."""
    return SimpleNamespace(
        parity=Parity(**row["parity"]),
        perplexity=row["perplexity"],
        greedy_first_divergence=row["greedy_first_divergence"],
    )


@pytest.fixture(scope="module", params=list(FAMILIES))
def pipeline(request, tiny_tokenizer_dir, tmp_path_factory) -> SimpleNamespace:
    """One family through the CLI: train (QLoRA, and LoRA) → merge (both bases) → GGUF F16,
    Q8_0, Q4_K_M → LoRA GGUF → ONNX fp32, fp16, int8, int4 → bench → package → verify."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = family_model(family, tiny_tokenizer_dir, root / "base")
    data = write_jsonl(root / "facts.jsonl", facts_rows())
    eval_text = root / "eval.txt"
    eval_text.write_text(EVAL, encoding="utf-8")
    train = ("--compute-dtype", "fp32", "--max-steps", "15", "--batch-size", "4")
    train += ("--max-length", "64", "--lr", "5e-3", "--dropout", "0", "--eval-fraction", "0.25")
    for method in ("qlora", "lora"):
        _cli(
            "train",
            "--base",
            base,
            "--data",
            data,
            "--out",
            root / method,
            "--method",
            method,
            *train,
        )
    for adapter, merge_base in (
        ("qlora", "dequantized"),
        ("qlora", "original"),
        ("lora", "original"),
    ):
        out = root / f"merged-{adapter}-{merge_base}"
        _cli("merge", "--adapter", root / adapter, "--out", out, "--merge-base", merge_base)
    merged = root / "merged-qlora-dequantized"
    _cli(
        "export",
        "gguf",
        "--model",
        merged,
        "--quant",
        "f16,q8_0,q4_k_m",
        "--out",
        root / "gguf",
        "--eval-text",
        eval_text,
    )
    _cli(
        "export",
        "gguf-lora",
        "--adapter",
        root / "qlora",
        "--out",
        root / "gguf-lora",
        "--type",
        "f32",
        "--eval-text",
        eval_text,
    )
    _cli(
        "export",
        "onnx",
        "--model",
        merged,
        "--quant",
        "fp32,fp16,int8,int4",
        "--out",
        root / "onnx",
        "--eval-text",
        eval_text,
    )
    q4 = root / "gguf" / "model-q4_k_m.gguf"
    _cli(
        "bench",
        "--out",
        root / "bench",
        "--eval",
        eval_text,
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--depths",
        "0",
        "--prompt-tokens",
        "16",
        "--decode-tokens",
        "8",
        q4,
        root / "onnx" / "int4",
    )
    _cli("package", "--target", "android", "--out", root / "bundle", q4)
    _cli("verify", root / "bundle")
    _cli("package", "--target", "ios", "--out", root / "bundle-onnx", root / "onnx" / "int4")
    _cli("verify", root / "bundle-onnx")
    config = _config(merged)
    return SimpleNamespace(
        root=root,
        base=base,
        merged=merged,
        config=config,
    )


def _expected(model: Path, context: int | None) -> Expected:
    return Expected.of(get_runtime("torch").load(model, threads=2), EVAL, context)


def test_training_learns_and_both_merges_keep_the_trained_model(pipeline):
    for method in ("qlora", "lora"):
        results = _record(pipeline.root / method)["results"]
        assert results["eval_loss"] < results["eval_loss_before"], (method, results)
    merged = sorted(pipeline.root.glob("merged-*"))
    assert len(merged) == 3
    for folder in merged:
        results = _record(folder)["results"]
        if folder.name == "merged-qlora-original":  # the full-precision base: not as trained
            assert not results["gated"] and "parity_vs_as_trained" in results
        else:
            assert results["gated"] and results["within_tolerance"], (folder.name, results)


def test_gguf_files_match_the_checkpoint(pipeline):
    record = _record(pipeline.root / "gguf")
    files = {row["file"]: row for row in record["results"]["files"]}
    context = uniform_context(pipeline.config)
    expected = _expected(pipeline.merged, context)
    # F16 weights and llama.cpp's F16 rounding, through this family's layers
    bound = for_model(FP16_ROUNDING + FP16_WEIGHTS, pipeline.config)
    expected.assert_matched(_report(files["model-f16.gguf"]), bound)
    assert files["model-f16.gguf"]["gated"]
    for name, main_type in (("model-q8_0.gguf", "q8_0"), ("model-q4_k_m.gguf", None)):
        types = files[name]["tensor_types"]
        assert main_type is None or main_type in types, types
        assert files[name]["parity"]["mean_kl"] < 1.0
    assert record["results"]["tokenizer"]["mismatches"] == []


def test_lora_gguf_over_the_base_matches_the_merged_gguf(pipeline, tmp_path):
    """Base + adapter in llama.cpp (x·W + s·(x·A)·B) against the merged checkpoint's GGUF
    (x·(W + s·A·B)), both F32 in llama.cpp: the same F16 KV cache on both sides, so only the
    two orders' rounding differs (see tests/test_gguf.py)."""
    from edgeft.export.gguf.convert import convert_checkpoint
    from edgeft.formats import SOURCE_SHA_KEY
    from edgeft.models import weights_sha256

    assert _record(pipeline.root / "gguf-lora")["results"]["gated"]
    ids = _ids(pipeline.merged, 120)

    def logits(model: Path, name: str, adapter: Path | None = None) -> np.ndarray:
        source = {SOURCE_SHA_KEY: weights_sha256(model)}  # what the runtime checks an adapter by
        convert_checkpoint(model, tmp_path / name, "f32", metadata=source)
        session = get_runtime("llama.cpp").load(tmp_path / name, threads=2, lora_path=adapter)
        try:
            return np.asarray(session.logits(ids))
        finally:
            session.close()

    # the adapter over the full-precision base: what merge --merge-base original folds
    folded = logits(pipeline.root / "merged-qlora-original", "merged.gguf")
    lora = pipeline.root / "gguf-lora" / "lora-f32.gguf"
    bound = for_model(FP16_ROUNDING, pipeline.config)
    assert_logits_close(logits(pipeline.base, "base.gguf", lora), folded, bound)
    assert_bug_caught(logits(pipeline.base, "base.gguf"), folded, bound, "adapter not applied")


def test_onnx_folders_match_the_checkpoint(pipeline):
    folders = {row["folder"]: row for row in _record(pipeline.root / "onnx")["results"]["folders"]}
    expected = _expected(pipeline.merged, pipeline.config["max_position_embeddings"])
    expected.assert_matched(_report(folders["fp32"]), for_model(FP32_ORDER, pipeline.config))
    assert folders["fp32"]["gated"] and folders["fp16"]["gated"]
    for row in folders.values():
        assert row["genai_greedy_identical"], row["folder"]
    for quant in ("int8", "int4"):
        assert "MatMulNBits" in folders[quant]["ops"] and "MatMul" not in folders[quant]["ops"]


def test_bench_measures_both_runtimes_and_the_bundle_verifies(pipeline):
    rows = json.loads((pipeline.root / "bench" / "results.json").read_text())["artifacts"]
    assert [row["runtime"] for row in rows] == ["llama.cpp", "onnxruntime-genai"], rows
    for row in rows:
        assert row["status"] == "ok" and row["latency"]["decode"][0]["tok_s"]["median"] > 0, row
        assert row["accuracy"]["perplexity"] > 1, row
    for bundle in ("bundle", "bundle-onnx"):
        manifest = json.loads((pipeline.root / bundle / "manifest.json").read_text())
        assert manifest["golden"] and manifest["files"], bundle


# --- each quirk matters: switched off, the export is far outside the bound ------------------


def _ids(model: Path, n: int) -> list[int]:
    session = get_runtime("torch").load(model, threads=2)
    try:
        return session.tokenize(" ".join(CORPUS))[:n]
    finally:
        session.close()


def _torch_logits(model: Path, ids: list[int]) -> np.ndarray:
    session = get_runtime("torch").load(model, threads=2)
    try:
        return np.asarray(session.logits(ids))
    finally:
        session.close()


def _onnx_logits(model: Path, ids: list[int], out: Path) -> np.ndarray:
    import onnx
    import onnxruntime as ort

    from edgeft.export.onnx.graph import build_fused_graph

    out.mkdir(parents=True, exist_ok=True)
    onnx.save(build_fused_graph(model), str(out / "model.onnx"))
    config = _config(model)
    shape = attention_shape(config)
    feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in range(config["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros(
                (1, shape.kv_heads, 0, shape.head_dim), np.float32
            )
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0][0]


def _gguf_logits(model: Path, ids: list[int], out: Path) -> np.ndarray:
    from edgeft.export.gguf.convert import convert_checkpoint

    convert_checkpoint(model, out, "f32")
    session = get_runtime("llama.cpp").load(out, threads=2, n_ctx=512)
    try:
        return np.asarray(session.logits(ids))
    finally:
        session.close()


def _without(model: Path, out: Path, edit) -> Path:
    """A copy of ``model`` whose config.json went through ``edit``: the quirk switched off."""
    shutil.copytree(model, out)
    config = _config(out)
    edit(config)
    # written in the 4.x layout, which transformers 5 also reads: the edit is all there is
    config.pop("rope_parameters", None)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _drop(*keys):
    return lambda config: [config.pop(k, None) for k in keys]


def _set(**values):
    return lambda config: config.update(values)


def _long_as_short(config):
    config["rope_scaling"]["long_factor"] = config["rope_scaling"]["short_factor"]


# (family, quirk, how the config loses it, or the table field switched off)
QUIRKS = [
    ("llama3", "llama3 rope frequencies", _drop("rope_scaling"), None),
    ("qwen3", "per-head q/k norms", None, {"qk_norm": False}),
    ("gemma3", "(1 + w) norms", None, {"norm_offset": 0.0}),
    ("gemma3", "embedding scale", None, {"embed_scale": False}),
    ("gemma3", "norms after attention and the MLP", None, {"sandwich_norms": False}),
    ("gemma3", "sliding windows", _set(sliding_window=None), None),
    ("gemma3", "local rope base", _drop("rope_local_base_freq"), None),
    ("gemma3", "query_pre_attn_scalar", _drop("query_pre_attn_scalar"), None),
    ("gemma3", "final logit soft-cap", _set(final_logit_softcapping=None), None),
    ("phi3", "LongRoPE long factors", _long_as_short, None),
    ("smollm3", "rope-free layers", _set(no_rope_layers=[1, 1, 1, 1]), None),
]


@pytest.fixture(scope="module")
def family_models(tiny_tokenizer_dir, tmp_path_factory):
    models = {}

    def get(family: str) -> Path:
        if family not in models:
            root = tmp_path_factory.mktemp(f"{family}-quirks")
            models[family] = family_model(family, tiny_tokenizer_dir, root / "model")
        return models[family]

    return get


@pytest.mark.parametrize(
    ("family", "quirk", "edit", "field"), QUIRKS, ids=[f"{f}-{q}" for f, q, *_ in QUIRKS]
)
def test_each_quirk_is_applied_in_onnx(
    family, quirk, edit, field, family_models, tmp_path, monkeypatch
):
    model = family_models(family)
    ids = _ids(model, LONG_IDS if family == "phi3" else 200)
    expected = _torch_logits(model, ids)
    bound = for_model(FP32_ORDER, _config(model))
    assert_logits_close(_onnx_logits(model, ids, tmp_path / "right"), expected, bound)
    if edit is not None:
        model = _without(model, tmp_path / "broken-model", edit)
    if field is not None:
        name = architecture_of(_config(model)).name
        monkeypatch.setitem(ARCHITECTURES, name, replace(ARCHITECTURES[name], **field))
    assert_bug_caught(_onnx_logits(model, ids, tmp_path / "broken"), expected, bound, quirk)


GGUF_QUIRKS = [q for q in QUIRKS if q[2] is not None and q[0] != "smollm3"] + [
    ("gemma3", "(1 + w) norms", None, {"norm_offset": 0.0}),
    ("qwen3", "per-head q/k norms are written", None, "drop_qk_norm"),
]


@pytest.mark.parametrize(
    ("family", "quirk", "edit", "field"),
    GGUF_QUIRKS,
    ids=[f"{f}-{q}" for f, q, *_ in GGUF_QUIRKS],
)
def test_each_quirk_is_applied_in_llama_cpp(
    family, quirk, edit, field, family_models, tmp_path, monkeypatch
):
    model = family_models(family)
    config = _config(model)
    # within the context llama.cpp computes like transformers (LongRoPE: its long factors,
    # which llama.cpp picks for a context past the original 256)
    ids = _ids(model, LONG_IDS if family == "phi3" else 200)
    expected = _torch_logits(model, ids)
    bound = for_model(FP16_ROUNDING, config)
    assert_logits_close(_gguf_logits(model, ids, tmp_path / "right.gguf"), expected, bound)
    if edit is not None:
        model = _without(model, tmp_path / "broken-model", edit)
    if isinstance(field, dict):
        name = architecture_of(config).name
        monkeypatch.setitem(ARCHITECTURES, name, replace(ARCHITECTURES[name], **field))
    elif field == "drop_qk_norm":
        from edgeft.export.gguf import convert

        original = convert._transform
        monkeypatch.setattr(
            convert,
            "_transform",
            lambda spec, name: (
                (lambda a: np.ones_like(a))
                if name.endswith(("q_norm.weight", "k_norm.weight"))
                else original(spec, name)
            ),
        )
    assert_bug_caught(_gguf_logits(model, ids, tmp_path / "broken.gguf"), expected, bound, quirk)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
    ids=["default", "linear", "llama3"],
)
def test_rope_frequencies_are_transformers(scaling):
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling=scaling,
    )
    if rope_kind(scaling) in ROPE_INIT_FUNCTIONS:
        expected, factor = ROPE_INIT_FUNCTIONS[rope_kind(scaling)](config, "cpu")
    else:  # transformers 5 computes the default rope in each model, as 4.x's "default" did
        dim = config.hidden_size // config.num_attention_heads
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        expected, factor = torch.from_numpy(1.0 / (500000.0**exponents)), 1.0
    got, got_factor = inverse_frequencies(model_config(config), 500000.0, scaling)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
    assert got_factor == factor


@pytest.mark.parametrize("long", [False, True])
def test_longrope_frequencies_are_transformers(long):
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "type": "longrope",
        "short_factor": [1.0 + i / 10 for i in range(24)],
        "long_factor": [1.0 + i for i in range(24)],
    }
    config = Phi3Config(
        hidden_size=256,
        num_attention_heads=4,
        partial_rotary_factor=0.75,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling=scaling,
    )
    seq_len = 5000 if long else None
    expected, factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)
    got, got_factor = inverse_frequencies(config.to_dict(), 10000.0, scaling, long=long)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
    assert got_factor == pytest.approx(factor)


# --- each family's tokenizer -------------------------------------------------------------------

FAMILY_TOKENIZERS = {  # family → (llama.cpp tokenizer model, pre-tokenizer)
    "llama3": ("gpt2", "llama-bpe"),
    "qwen3": ("gpt2", "qwen2"),
    "gemma3": ("llama", "default"),
    "phi3": ("gpt2", "gpt-4o"),
    "smollm3": ("gpt2", "llama-bpe"),
}


@pytest.mark.parametrize("family", list(FAMILY_TOKENIZERS))
def test_family_tokenizers_give_identical_ids_in_every_runtime(family, tmp_path):
    """The family's pre-tokenizer, special tokens and chat template (tests/data/chat_templates)
    through llama.cpp's and onnxruntime-genai's tokenizers: the same ids as transformers."""
    from conftest import family_tokenizer

    from edgeft.export.gguf import export_gguf
    from edgeft.export.onnx.export import export_onnx
    from edgeft.gguf_file import gguf_metadata

    tokenizer = family_tokenizer(family, tmp_path / "tokenizer")
    # the templates' own system prompts (SmolLM3's, Llama 3's dated header) need the room
    model = family_model(family, tokenizer, tmp_path / "model", max_position_embeddings=2048)
    gguf = export_gguf(model, tmp_path / "gguf", "f32", eval_text=EVAL)
    assert gguf.tokenizer["mismatches"] == [] and gguf.tokenizer["chat_template_identical"]
    meta = gguf_metadata(tmp_path / "gguf" / "model-f32.gguf")
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == FAMILY_TOKENIZERS[family]
    export_onnx(model, tmp_path / "onnx", "fp32", eval_text=EVAL)
    results = _record(tmp_path / "onnx")["results"]
    assert results["genai_tokenizer"]["mismatches"] == []
    assert results["genai_tokenizer"]["chat_template_identical"] or any(
        "renders the chat template differently" in note for note in results["notes"]
    )


def test_phi4_mini_text_split_by_another_name_is_caught(tmp_path, monkeypatch):
    """The identity gate sees the difference between GPT-4o's splitting rules and Llama 3's
    (digits by three alike, cased words apart only in GPT-4o's)."""
    from conftest import family_tokenizer

    from edgeft.export.gguf import export_gguf, vocab

    tokenizer = family_tokenizer("phi3", tmp_path / "tokenizer")
    model = family_model("phi3", tokenizer, tmp_path / "model")
    wrong = {k: ("llama-bpe" if v == "gpt-4o" else v) for k, v in vocab.BPE_PRE_TOKENIZERS.items()}
    monkeypatch.setattr(vocab, "BPE_PRE_TOKENIZERS", wrong)
    with pytest.raises(ModelError, match="llama.cpp tokenizes differently"):
        export_gguf(model, tmp_path / "gguf", "f32", eval_text=EVAL)
    assert not (tmp_path / "gguf").exists()


# --- k-quants on rows 256 wide ----------------------------------------------------------------

K_QUANTS = {  # type → (general.file_type, tensor types it must hold)
    "q4_k_m": (15, {"q4_k", "q6_k"}),
    "q5_k_m": (17, {"q5_k", "q6_k"}),
    "q6_k": (18, {"q6_k"}),
    "q4_0": (2, {"q4_0"}),
    "q8_0": (7, {"q8_0"}),
}


def test_k_quants_run_on_rows_256_wide(tiny_tokenizer_dir, tmp_path):
    from edgeft.export.gguf import export_gguf
    from edgeft.gguf_file import gguf_metadata, read_gguf

    # Every quantized row (q/k/v/gate/up: hidden, o_proj: heads × head_dim, down: MLP) is a
    # multiple of 256 wide, so llama.cpp uses the k-quant types themselves, not a fallback.
    model = family_model(
        "qwen3",
        tiny_tokenizer_dir,
        tmp_path / "wide",
        hidden_size=256,
        intermediate_size=512,
        head_dim=64,
    )
    result = export_gguf(model, tmp_path / "out", ",".join(K_QUANTS), eval_text=EVAL)
    for report in result.files:
        file_type, must_hold = K_QUANTS[report.type]
        path = tmp_path / "out" / report.file
        assert gguf_metadata(path)["general.file_type"] == file_type, report.type
        held = set(read_gguf(path).tensor_type_counts())
        assert must_hold <= held, (report.type, held)


# --- refusals: one line naming what is supported, nothing written -----------------------------


def test_an_unknown_rope_kind_is_refused_by_every_export(family_models, tmp_path, capsys):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    model = _without(family_models("llama3"), tmp_path / "yarn", _set(rope_scaling=yarn))
    for command in (("gguf", "--quant", "f16"), ("onnx", "--quant", "fp32")):
        out = tmp_path / command[0]
        assert (
            main(["export", command[0], "--model", str(model), "--out", str(out), *command[1:]])
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "rope_scaling 'yarn'" in err and "supported: default, linear, llama3" in err
        assert not out.exists() and not list(tmp_path.glob(f"{command[0]}*.partial"))


def test_a_rope_free_layout_llama_cpp_cannot_express_is_refused(family_models, tmp_path):
    from edgeft.export.gguf.convert import read_model_spec

    model = _without(family_models("smollm3"), tmp_path / "odd", _set(no_rope_layers=[1, 0, 1, 1]))
    with pytest.raises(ModelError, match="no_rope_layers .* every 4th layer"):
        read_model_spec(model)
    ids = _ids(model, 64)  # the fused ONNX graph takes any layout
    assert_logits_close(
        _onnx_logits(model, ids, tmp_path / "onnx"),
        _torch_logits(model, ids),
        for_model(FP32_ORDER, _config(model)),
    )


def test_a_fused_projection_is_targeted_by_its_fused_name(family_models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows())
    args = [
        "train",
        "--base",
        str(family_models("phi3")),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "a"),
        "--target-modules",
        "q_proj,v_proj",
        "--max-steps",
        "1",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "stores q_proj, k_proj, v_proj as one module, qkv_proj; target qkv_proj" in err
    assert not (tmp_path / "a").exists()


def test_a_rotary_width_onnxruntime_cannot_rotate_is_refused(tiny_tokenizer_dir, tmp_path):
    from edgeft.export.onnx.graph import build_fused_graph

    model = family_model("qwen3", tiny_tokenizer_dir, tmp_path / "m", head_dim=24)
    with pytest.raises(ModelError, match="rotary dimension 24: .* multiple of 16"):
        build_fused_graph(model)


def test_an_fp16_folder_that_overflows_is_refused(family_models, tmp_path):
    """Gemma's activations outgrow fp16: embeddings within fp16's range, times √hidden past
    it. The fp16 folder's logits are not finite; the export says so and writes nothing."""
    from safetensors.numpy import load_file, save_file

    from edgeft.errors import ParityError
    from edgeft.export.onnx.export import export_onnx

    model = _without(family_models("gemma3"), tmp_path / "loud", lambda config: None)
    weights = load_file(model / "model.safetensors")
    table = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = table * (40000 / np.abs(table).max())  # < 65504
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ParityError, match="fp16 ONNX model .* overflows: .* export fp32, int8"):
        export_onnx(model, tmp_path / "out", "fp32,fp16", eval_text=EVAL)
    assert not (tmp_path / "out").exists()


def test_inspect_describes_a_checkpoint_by_its_entry(family_models, tmp_path):
    from edgeft.inspect import inspect_file, render_inspection

    info = inspect_file(family_models("gemma3"))
    assert info["format"] == "checkpoint" and info["windows"] == [8]
    assert {"q/k norms", "(1 + w) norms", "embedding × √hidden"} <= set(info["quirks"])
    assert info["stages"]["gguf"].startswith("llama.cpp gemma3")
    phi3 = render_inspection(inspect_file(family_models("phi3")))
    assert "LoRA / QLoRA targets: qkv_proj, o_proj, gate_up_proj, down_proj" in phi3
    odd = _without(family_models("smollm3"), tmp_path / "odd", _set(no_rope_layers=[1, 0, 1, 1]))
    assert inspect_file(odd)["stages"]["gguf"].startswith("refused: ")


def test_every_entry_names_a_llama_cpp_architecture_gguf_knows():
    import gguf

    names = set(gguf.MODEL_ARCH_NAMES.values())
    for architecture in ARCHITECTURES.values():
        assert architecture.gguf_arch in names, architecture.name
