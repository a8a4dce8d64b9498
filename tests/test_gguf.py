"""GGUF export on tiny models built in-process, and on the default model's tokenizer and weights:
token-id identity through llama.cpp, logits parity, every quantization, LoRA GGUFs, errors,
atomic writes."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, FAST_TRAIN, tiny_model, tokenizer_with_pre
from numerics import (
    FP16_ROUNDING,
    FP16_WEIGHTS,
    Expected,
    assert_argmax_agrees_off_ties,
    assert_bug_caught,
    assert_logits_close,
    kl_bound,
    logit_scale,
)

from edgeft.errors import ModelError, OutputExistsError, ParityError
from edgeft.export.gguf import GGUF_TYPES, export_gguf, export_gguf_lora
from edgeft.export.gguf.convert import convert_checkpoint
from edgeft.export.gguf.export import _check_tokenizer
from edgeft.export.gguf.vocab import read_vocab
from edgeft.gguf_file import gguf_metadata
from edgeft.parity import compare_logits
from edgeft.runtimes import get_runtime
from edgeft.session import generate

SHORT_EVAL = " ".join(CORPUS[:6])


def _record(out):
    return json.loads((out / "edgeft.json").read_text())


def _expected(checkpoint: Path) -> Expected:
    """The checkpoint in PyTorch fp32 on the eval text, as the export's parity gate sees it."""
    config = json.loads((checkpoint / "config.json").read_text())
    session = get_runtime("torch").load(checkpoint, threads=2)
    return Expected.of(session, SHORT_EVAL, config.get("max_position_embeddings"))


@pytest.fixture(scope="module")
def llama_export(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "llama"
    return export_gguf(tiny_llama, out, "f32,f16", eval_text=SHORT_EVAL)


def test_f32_and_f16_match_the_checkpoint(llama_export, tiny_llama):
    files = {f.type: f for f in llama_export.files}
    expected = _expected(tiny_llama)
    assert expected.perplexity == pytest.approx(llama_export.reference_perplexity, rel=1e-9)
    # llama.cpp keeps its KV cache in F16, so even F32 weights are off by fp16 rounding
    expected.assert_matched(files["f32"], FP16_ROUNDING)
    expected.assert_matched(files["f16"], FP16_ROUNDING + FP16_WEIGHTS)
    assert llama_export.tokenizer["mismatches"] == []
    assert llama_export.tokenizer["chat_template_identical"] is True
    assert sorted(p.name for p in llama_export.out.iterdir()) == [
        "edgeft.json",
        "model-f16.gguf",
        "model-f32.gguf",
    ]


def test_record_and_gguf_metadata(llama_export, tiny_llama):
    from edgeft.models import weights_sha256

    record = _record(llama_export.out)
    assert record["stage"] == "export-gguf"
    assert [f["file"] for f in record["results"]["files"]] == ["model-f32.gguf", "model-f16.gguf"]
    assert record["results"]["tokenizer"]["pre"] == "gpt-2"
    meta = gguf_metadata(llama_export.out / "model-f16.gguf")
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == 1
    assert meta["edgeft.source.sha256"] == weights_sha256(tiny_llama)
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert "tokenizer.chat_template" in meta
    assert not (llama_export.out.parent / "llama.partial").exists()


def test_existing_output_needs_force(llama_export, tiny_llama):
    with pytest.raises(OutputExistsError):
        export_gguf(tiny_llama, llama_export.out, "f32")


@pytest.mark.parametrize("out_type", ["f16", "bf16"])
def test_tables_written_in_row_pieces_equal_whole(tiny_llama, tmp_path, monkeypatch, out_type):
    """The converter casts a 2-D tensor a few rows at a time (an 8B model's vocabulary table is
    2.1 GB in fp32): the file is byte for byte the one a whole-tensor cast writes."""
    from functools import partial

    import edgeft.export.gguf.convert as convert
    from edgeft.weights import row_chunks

    whole = tmp_path / "whole.gguf"
    convert_checkpoint(tiny_llama, whole, out_type)
    monkeypatch.setattr(convert, "row_chunks", partial(row_chunks, max_bytes=1000))
    pieces = tmp_path / "pieces.gguf"
    convert_checkpoint(tiny_llama, pieces, out_type)
    assert pieces.read_bytes() == whole.read_bytes()


def test_every_type_loads_and_generates(tiny_llama, tmp_path):
    quants = [t for t in GGUF_TYPES if t not in ("f32", "f16")]
    # no calibration data: the importance matrix the low-bit types need is computed on text
    # sampled from the model
    result = export_gguf(tiny_llama, tmp_path / "all", quants, eval_text=SHORT_EVAL, imatrix="auto")
    assert [f.type for f in result.files] == quants
    assert result.imatrix["source"] == "text sampled from the model"
    runtime = get_runtime("llama.cpp")
    for report in result.files:
        meta = gguf_metadata(tmp_path / "all" / report.file)
        assert meta["edgeft.version"]
        session = runtime.load(tmp_path / "all" / report.file, threads=2)
        try:
            assert len(generate(session, session.tokenize("hello", chat=True), 8)) >= 1
        finally:
            session.close()
        assert np.isfinite(report.perplexity) and report.parity.top1_agreement > 0.3
    # the intermediate F32 the quantizer read is not left behind
    assert not (tmp_path / "all" / "model-f32.gguf").exists()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_match(arch, tiny_tokenizer_dir, spm_tokenizer_dir, tmp_path):
    tokenizer = spm_tokenizer_dir if arch == "mistral" else tiny_tokenizer_dir
    model = tiny_model(arch, tokenizer, tmp_path / "model", tie_word_embeddings=False)
    result = export_gguf(model, tmp_path / "out", "f32", eval_text=SHORT_EVAL)
    _expected(model).assert_matched(result.files[0], FP16_ROUNDING)
    assert result.tokenizer["mismatches"] == []


def test_sentencepiece_vocabulary(spm_tokenizer_dir, tmp_path):
    model = tiny_model("llama", spm_tokenizer_dir, tmp_path / "model")
    vocab = read_vocab(model, 600)
    assert (vocab.model, vocab.pre, vocab.add_bos, vocab.add_space_prefix) == (
        "llama",
        "default",
        True,
        True,
    )
    assert vocab.types.count(6) == 256  # byte tokens
    gguf = tmp_path / "spm.gguf"
    convert_checkpoint(model, gguf, "f32", vocab=vocab)
    result = _check_tokenizer(model, gguf, vocab, threads=2)
    assert result["mismatches"] == [] and result["chat_template_identical"]


def _splits():
    from tokenizers import Regex, pre_tokenizers

    from edgeft.export.gguf.vocab import _LLAMA3_REGEX, _QWEN2_REGEX

    def split_then_bytes(regex):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    return {
        "llama-bpe": split_then_bytes(_LLAMA3_REGEX),
        "qwen2": split_then_bytes(_QWEN2_REGEX),
        "smollm": pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        ),
    }


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm"])
def test_pre_tokenizers_give_identical_ids(pre, tmp_path):
    tokenizer = tokenizer_with_pre(tmp_path / "tok", _splits()[pre])
    model = tiny_model("llama", tokenizer, tmp_path / "model")
    vocab = read_vocab(model, 400)
    assert vocab.pre == pre
    gguf = tmp_path / "m.gguf"
    convert_checkpoint(model, gguf, "f32", vocab=vocab)
    assert _check_tokenizer(model, gguf, vocab, threads=2)["mismatches"] == []


def test_default_model_tokenizer_and_f16(tmp_path):
    """The embedded SmolLM2: its 'smollm' tokenizer maps exactly and F16 matches fp32."""
    from edgeft.models import default_model_dir

    result = export_gguf(default_model_dir(), tmp_path / "smollm2", "f16")
    assert result.tokenizer["mismatches"] == [] and result.tokenizer["chat_template_identical"]
    assert result.tokenizer["texts"] >= 20
    f16 = result.files[0]
    assert f16.parity.mean_kl < 1e-4 and f16.parity.top1_agreement > 0.98
    assert abs(f16.perplexity - result.reference_perplexity) / result.reference_perplexity < 0.01
    meta = gguf_metadata(tmp_path / "smollm2" / "model-f16.gguf")
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import Regex, pre_tokenizers

    odd = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[a-z]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(use_regex=False),
        ]
    )
    model = tiny_model("llama", tokenizer_with_pre(tmp_path / "tok", odd), tmp_path / "m")
    with pytest.raises(ModelError, match="matches none llama.cpp reproduces"):
        export_gguf(model, tmp_path / "out", "f32")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported(tiny_llama, tmp_path):
    import shutil

    model = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="supported: LlamaForCausalLM, MistralForCausalLM"):
        export_gguf(model, tmp_path / "out", "f16")


def test_quantized_checkpoint_is_refused(tiny_llama, tmp_path):
    import shutil

    model = tmp_path / "bnb"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="quantized .bitsandbytes."):
        export_gguf(model, tmp_path / "out", "q4_k_m")


def test_unknown_type_is_refused(tiny_llama, tmp_path):
    from edgeft.errors import EdgeftError

    with pytest.raises(EdgeftError, match="unknown GGUF type 'q3_k'"):
        export_gguf(tiny_llama, tmp_path / "out", "f16,q3_k")


def test_a_converter_bug_fails_the_export_and_writes_nothing(tiny_llama, tmp_path, monkeypatch):
    """Skipping the q/k row reordering is the classic 'gibberish after GGUF' bug: the parity
    gate must catch it, and no output may appear under the final name."""
    import edgeft.export.gguf.convert as convert

    monkeypatch.setattr(convert, "permute_rotary", lambda weight, n_head: weight)
    with pytest.raises(ParityError, match="model-f32.gguf differs"):
        export_gguf(tiny_llama, tmp_path / "out", "f32,q8_0", eval_text=SHORT_EVAL)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_parity_bounds_fail_a_wrong_rotary_permutation(tiny_llama, tmp_path, monkeypatch):
    """The bounds the tests above allow for fp16 rounding are far tighter than the classic
    converter bug: a GGUF whose q/k rows are not reordered for llama.cpp's rotary fails them."""
    import edgeft.export.gguf.convert as convert

    expected = _expected(tiny_llama)
    monkeypatch.setattr(convert, "permute_rotary", lambda weight, n_head: weight)
    broken = tmp_path / "broken.gguf"
    convert_checkpoint(tiny_llama, broken, "f32")
    session = get_runtime("llama.cpp").load(broken, threads=2)
    try:
        logits = session.logits(expected.ids)
    finally:
        session.close()
    assert_bug_caught(logits, expected.logits, FP16_ROUNDING, "q/k rows not permuted for rotary")
    scale = logit_scale(expected.logits)
    assert compare_logits(expected.logits, logits).mean_kl > 10 * kl_bound(FP16_ROUNDING, scale)


def test_failed_quantization_keeps_the_old_output(llama_export, tiny_llama, monkeypatch):
    import edgeft.export.gguf.export as export

    before = {p.name: p.stat().st_mtime_ns for p in llama_export.out.iterdir()}

    def broken(*args, **kwargs):
        raise ModelError("quantizer failed")

    monkeypatch.setattr(export, "quantize", broken)
    with pytest.raises(ModelError, match="quantizer failed"):
        export_gguf(tiny_llama, llama_export.out, "q8_0", force=True)
    assert {p.name: p.stat().st_mtime_ns for p in llama_export.out.iterdir()} == before


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama, tmp_path_factory):
    from conftest import facts_rows, write_jsonl

    from edgeft.train import TrainSettings, train

    tmp = tmp_path_factory.mktemp("lora")
    settings = TrainSettings(method="lora", **{**FAST_TRAIN, "max_steps": 12})
    data = write_jsonl(tmp / "f.jsonl", facts_rows())
    return train(str(tiny_llama), data, tmp / "a", settings, progress=False).out


@pytest.fixture(scope="module")
def lora_export(lora_adapter, llama_export, tmp_path_factory):
    base = llama_export.out / "model-f32.gguf"
    out = tmp_path_factory.mktemp("lora-gguf") / "lora"
    return export_gguf_lora(
        lora_adapter, out, base_gguf=base, lora_type="f32", eval_text=SHORT_EVAL
    )


def test_lora_gguf_matches_the_adapter(lora_export, lora_adapter):
    result = lora_export
    assert result.modules == 14 and result.alpha == 16
    assert result.gated
    # F32 base + F32 adapter in llama.cpp against peft in PyTorch fp32: fp16 KV rounding
    adapter = get_runtime("torch").load(lora_adapter, threads=2)
    Expected.of(adapter, SHORT_EVAL).assert_matched(result, FP16_ROUNDING)
    meta = gguf_metadata(result.file)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert _record(result.out)["stage"] == "export-gguf-lora"


def test_llama_cpp_switches_the_adapter_in_one_session(lora_export, llama_export):
    base = llama_export.out / "model-f32.gguf"
    ids = list(range(3, 40))
    runtime = get_runtime("llama.cpp")
    expected = {}
    for adapter in (lora_export.file, None):
        session = runtime.load(base, threads=2, lora_path=adapter)
        expected[adapter] = session.logits(ids)
        session.close()
    session = runtime.load(base, threads=2)
    try:
        for adapter in (lora_export.file, None, lora_export.file):
            session.set_adapter(adapter)
            assert np.array_equal(session.logits(ids), expected[adapter]), adapter
    finally:
        session.close()
    assert not np.array_equal(expected[lora_export.file], expected[None])


def _with_alpha(adapter: Path, alpha: float, out: Path) -> Path:
    """A copy of a LoRA GGUF whose alpha is changed: the scale alpha/rank that llama.cpp
    applies is then off, the classic bug of an adapter converted with the wrong alpha."""
    import shutil

    import gguf

    shutil.copy(adapter, out)
    reader = gguf.GGUFReader(str(out), "r+")
    field = reader.fields[gguf.Keys.Adapter.LORA_ALPHA]
    field.parts[field.data[0]][0] = alpha
    del reader  # flushes the memory map
    return out


def test_lora_over_base_equals_merged_gguf(lora_adapter, llama_export, tmp_path):
    """x·W + s·(x·A)·B in llama.cpp equals x·(W + s·A·B) folded by merge, within fp16 rounding:
    llama.cpp keeps K and V in F16 (and rounds q to F16 for q·k), so the two orders' fp32 noise
    can round an element to a neighbouring half; bound: ``FP16_ROUNDING`` of the logits' scale
    (measured 1.6e-4 on AMD EPYC without AVX-512). An adapter that is not applied moves the
    logits by ~0.6 of their scale and an alpha/rank off by 2 by ~0.35, far outside it."""
    from edgeft.merge import merge

    merged = merge(lora_adapter, tmp_path / "merged").out
    merged_gguf = export_gguf(merged, tmp_path / "merged-gguf", "f32", eval_text=SHORT_EVAL)
    lora = export_gguf_lora(
        lora_adapter,
        tmp_path / "lora",
        base_gguf=llama_export.out / "model-f32.gguf",
        lora_type="f32",
        eval_text=SHORT_EVAL,
    )
    base = llama_export.out / "model-f32.gguf"
    ids = list(range(3, 40))

    def logits(path, adapter=None):
        session = get_runtime("llama.cpp").load(path, threads=2, lora_path=adapter)
        try:
            return session.logits(ids)
        finally:
            session.close()

    folded = logits(merged_gguf.out / "model-f32.gguf")
    assert_logits_close(logits(base, lora.file), folded, FP16_ROUNDING)
    assert_argmax_agrees_off_ties(folded, logits(base, lora.file), FP16_ROUNDING)
    # the bugs this comparison guards fail it
    rank = FAST_TRAIN["rank"]
    assert lora.alpha == 2 * rank
    broken = {
        "adapter not applied": logits(base),
        "scale 1 instead of alpha/rank 2": logits(
            base, _with_alpha(lora.file, float(rank), tmp_path / "alpha.gguf")
        ),
    }
    for bug, candidate in broken.items():
        assert_bug_caught(candidate, folded, FP16_ROUNDING, bug)


def test_lora_refuses_another_base(lora_adapter, tiny_qwen2, tmp_path):
    other = export_gguf(tiny_qwen2, tmp_path / "qwen", "f32", eval_text=SHORT_EVAL)
    with pytest.raises(ModelError, match="is a llama adapter but .* is a qwen2 model"):
        export_gguf_lora(lora_adapter, tmp_path / "lora", base_gguf=other.out / "model-f32.gguf")
    assert not (tmp_path / "lora").exists()


def test_lora_refuses_a_base_with_other_weights(
    lora_adapter, lora_export, tiny_tokenizer_dir, tmp_path
):
    stranger = tiny_model("llama", tiny_tokenizer_dir, tmp_path / "stranger")
    other = export_gguf(stranger, tmp_path / "gguf", "f32", eval_text=SHORT_EVAL)
    base = other.out / "model-f32.gguf"
    with pytest.raises(ModelError, match="is not the base .* was trained on"):
        export_gguf_lora(lora_adapter, tmp_path / "lora", base_gguf=base)
    # the runtime refuses the pairing too: llama.cpp alone would apply it (same shapes)
    with pytest.raises(ModelError, match="is not the base .* was trained on"):
        get_runtime("llama.cpp").load(base, threads=2, lora_path=lora_export.file)


def test_requantize_a_gguf_file(llama_export, tmp_path):
    from edgeft.errors import EdgeftError

    source = llama_export.out / "model-f16.gguf"
    result = export_gguf(source, tmp_path / "q8", "q8_0", eval_text=SHORT_EVAL)
    assert result.files[0].parity.mean_kl < 0.05 and not result.files[0].gated
    assert "measured against that file" in result.notes[0]
    quantized = tmp_path / "q8" / "model-q8_0.gguf"
    with pytest.raises(EdgeftError, match=r"already quantized \(q8_0\).*--allow-requantize"):
        export_gguf(quantized, tmp_path / "q4", "q4_0")
    again = export_gguf(quantized, tmp_path / "q4", "q4_0", allow_requantize=True)
    assert "already quantized" in again.notes[1]
    with pytest.raises(EdgeftError, match="only quantized types"):
        export_gguf(source, tmp_path / "f32", "f32")


def test_cli_export_gguf(tiny_llama, tmp_path, capsys):
    from edgeft.cli import main

    text = tmp_path / "eval.txt"
    text.write_text(SHORT_EVAL)
    args = ["export", "gguf", "--model", str(tiny_llama), "--eval-text", str(text)]
    assert main([*args, "--quant", "f32,q8_0", "--out", str(tmp_path / "o"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "token ids identical" in printed and "model-q8_0.gguf" in printed
    assert main([*args, "--quant", "f32,q9", "--out", str(tmp_path / "p")]) == 2
    assert "unknown GGUF type 'q9'" in capsys.readouterr().err
    assert main([*args, "--quant", "f32", "--out", str(tmp_path / "o")]) == 2
    assert "--force" in capsys.readouterr().err


def _header(n_tensors=0, n_kv=1, version=3) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty", b"", "no GGUF magic"),
        ("text", b"hello world, not a model", "no GGUF magic"),
        ("truncated", None, "past the end"),
        ("version", _header(version=99), "version 99"),
        ("counts", _header(n_tensors=1 << 40), "absurd counts"),
        ("key length", _header() + (1 << 62).to_bytes(8, "little"), "past the end"),
        (
            "array length",
            _header()
            + (3).to_bytes(8, "little")
            + b"abc"
            + (9).to_bytes(4, "little")
            + (4).to_bytes(4, "little")
            + (1 << 60).to_bytes(8, "little"),
            "past the end",
        ),
        (
            "dims",
            _header(n_tensors=1, n_kv=0)
            + (1).to_bytes(8, "little")
            + b"t"
            + (99).to_bytes(4, "little"),
            "99 dimensions",
        ),
    ],
)
def test_damaged_gguf_headers_are_refused(name, content, message, llama_export, tmp_path):
    import time

    from edgeft.gguf_file import read_gguf

    path = tmp_path / "bad.gguf"
    if content is None:  # a real file cut in the middle of its tensor data
        content = (llama_export.out / "model-f16.gguf").read_bytes()[:-1000]
    path.write_bytes(content)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=message):
        read_gguf(path)
    assert time.perf_counter() - start < 5


def test_gguf_lora_through_the_cli(lora_adapter, llama_export, tmp_path, capsys):
    from edgeft.cli import main

    base = llama_export.out / "model-f32.gguf"
    out = tmp_path / "lora"
    args = ["export", "gguf-lora", "--adapter", str(lora_adapter), "--base-gguf", str(base)]
    args += ["--out", str(out), "--type", "f32", "--eval-text", str(_eval_file(tmp_path))]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "14 LoRA modules (alpha 16) written to" in printed and "within tolerance" in printed
    assert gguf_metadata(out / "lora-f32.gguf")["general.type"] == "adapter"
    assert main(args) == 2  # the output exists: refused without --force
    assert "--force" in capsys.readouterr().err


def _eval_file(tmp_path: Path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(SHORT_EVAL, encoding="utf-8")
    return path


def test_a_gguf_bundle_ships_its_lora_and_verifies_it(lora_export, llama_export, tmp_path):
    """package --lora takes the LoRA GGUF exported over that very base (its recorded base
    weights, not the base file's own sha256) and verify reproduces its golden output."""
    from edgeft.package import package, verify

    base = llama_export.out / "model-f32.gguf"
    bundle = package(str(base), tmp_path / "b", "android", lora=[lora_export.file])
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["model"]["lora"] == [f"model/{lora_export.file.name}"]
    assert verify(bundle).adapters == 1
