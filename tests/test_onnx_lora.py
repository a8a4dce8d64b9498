"""A base ONNX folder with LoRA inputs and adapters that onnxruntime and onnxruntime-genai swap
at run time (``edgeft export onnx --adapter``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, FAST_TRAIN, facts_rows, tiny_model, write_jsonl
from numerics import FP32_ORDER, assert_bug_caught, assert_logits_close

from edgeft.errors import EdgeftError, ModelError
from edgeft.export.onnx import export_onnx
from edgeft.export.onnx.export import _write_fused
from edgeft.export.onnx.lora import mark_base, parse_adapters
from edgeft.formats import check_adapter, graph_lora_inputs
from edgeft.runtimes import get_runtime

SHORT_EVAL = " ".join(CORPUS[:6])
IDS = list(range(3, 40))


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """Two adapters of the tiny llama: every projection at rank 8, and q/v only at rank 4
    (so each file also carries empty pairs for the projections it leaves alone)."""
    from edgeft.train import TrainSettings, train

    tmp = tmp_path_factory.mktemp("onnx-lora")
    data = write_jsonl(tmp / "f.jsonl", facts_rows())
    every = TrainSettings(method="lora", **{**FAST_TRAIN, "max_steps": 12})
    qv = TrainSettings(
        method="lora",
        **{**FAST_TRAIN, "max_steps": 12, "rank": 4, "alpha": 4},
        target_modules=["q_proj", "v_proj"],
    )
    return {
        "every": train(str(tiny_llama), data, tmp / "every", every, progress=False).out,
        "qv": train(str(tiny_llama), data, tmp / "qv", qv, progress=False).out,
    }


@pytest.fixture(scope="module")
def lora_export(tiny_llama, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-lora-export") / "out"
    return export_onnx(tiny_llama, out, "fp32,int4", adapters=adapters, eval_text=SHORT_EVAL)


def _logits(runtime: str, folder, adapter=None) -> np.ndarray:
    session = get_runtime(runtime).load(folder, threads=2, adapter=adapter)
    try:
        return session.logits(IDS)
    finally:
        session.close()


def test_export_writes_a_base_and_an_adapter_file_each(lora_export):
    out = lora_export.out
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [
        "every.onnx_adapter",
        "qv.onnx_adapter",
    ]
    inputs, sha = graph_lora_inputs(out / "fp32" / "model.onnx")
    assert (
        len(inputs) == 2 * 14
        and sha
        == json.loads((out / "edgeft.json").read_text(encoding="utf-8"))["inputs"]["model"][
            "weights_sha256"
        ]
    )
    every, qv = lora_export.adapters
    assert (every.modules, every.rank, qv.modules, qv.rank) == (14, 8, 4, 4)
    for adapter in lora_export.adapters:
        fp32, int4 = adapter.folders
        assert fp32.gated and not int4.gated
        assert fp32.parity.mean_kl <= 1e-5 and fp32.genai_greedy_identical
        assert int4.parity.mean_kl < 0.5  # reported, not gated
    record = json.loads((out / "edgeft.json").read_text(encoding="utf-8"))
    assert [a["name"] for a in record["results"]["adapters"]] == ["every", "qv"]


def test_base_without_adapter_is_the_plain_export(lora_export, tiny_llama, tmp_path):
    """No adapter active: the empty LoRA inputs add exact zeros, so the logits are the plain
    graph's, bit for bit."""
    _write_fused(tiny_llama, tmp_path / "plain")
    plain = _logits("onnxruntime", tmp_path / "plain")
    base = _logits("onnxruntime", lora_export.out / "fp32")
    assert np.array_equal(plain, base)
    assert np.array_equal(_logits("onnxruntime-genai", lora_export.out / "fp32"), base)


@pytest.mark.parametrize("name", ["every", "qv"])
def test_base_plus_adapter_matches_the_merged_model(lora_export, adapters, name, tmp_path):
    """x·Wᵀ + (x·A)·B in onnxruntime (and genai) equals x·(W + s·B·A) merged in PyTorch, to
    fp32 reassociation; the base alone, or the other adapter, is far off."""
    from edgeft.merge import merge

    merged = merge(adapters[name], tmp_path / "merged").out
    expected = get_runtime("torch").load(merged, threads=2).logits(IDS)
    folder, files = lora_export.out / "fp32", lora_export.out / "adapters"
    applied = _logits("onnxruntime", folder, files / f"{name}.onnx_adapter")
    assert_logits_close(applied, expected, FP32_ORDER)
    genai = _logits("onnxruntime-genai", folder, files / f"{name}.onnx_adapter")
    assert_logits_close(genai, expected, FP32_ORDER)
    other = "qv" if name == "every" else "every"
    broken = {
        "adapter not applied": _logits("onnxruntime", folder),
        "the other adapter": _logits("onnxruntime", folder, files / f"{other}.onnx_adapter"),
    }
    for bug, candidate in broken.items():
        assert_bug_caught(candidate, expected, FP32_ORDER, bug)


def test_genai_switches_adapters_in_one_session(lora_export):
    folder, files = lora_export.out / "fp32", lora_export.out / "adapters"
    alone = {
        name: _logits("onnxruntime", folder, files / f"{name}.onnx_adapter" if name else None)
        for name in ("every", "qv", None)
    }
    session = get_runtime("onnxruntime-genai").load(folder, threads=2)
    try:
        for name in ("every", "qv", None, "every"):
            session.set_adapter(files / f"{name}.onnx_adapter" if name else None)
            assert np.array_equal(session.logits(IDS), alone[name]), name
    finally:
        session.close()


def test_adapter_of_another_base_is_refused(adapters, tiny_qwen2, tiny_tokenizer_dir, tmp_path):
    with pytest.raises(ModelError, match="was trained on another base"):
        export_onnx(tiny_qwen2, tmp_path / "q", "fp32", adapters={"every": adapters["every"]})
    # same shapes, other weights: refused by the recorded base weights
    stranger = tiny_model("llama", tiny_tokenizer_dir, tmp_path / "stranger")
    with pytest.raises(ModelError, match="was trained on another base"):
        export_onnx(stranger, tmp_path / "s", "fp32", adapters={"every": adapters["every"]})
    assert not (tmp_path / "q").exists() and not (tmp_path / "s").exists()


def test_runtimes_refuse_an_adapter_file_for_another_base(lora_export, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(lora_export.out / "fp32", folder)
    mark_base(folder, "f" * 64)  # a base with other weights, same shapes
    adapter = lora_export.out / "adapters" / "every.onnx_adapter"
    for runtime in ("onnxruntime", "onnxruntime-genai"):
        with pytest.raises(ModelError, match="made for another base"):
            get_runtime(runtime).load(folder, threads=2, adapter=adapter)
    broken = tmp_path / "broken.onnx_adapter"
    broken.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(ModelError, match="is not an onnxruntime adapter file"):
        check_adapter(broken, lora_export.out / "fp32" / "model.onnx")


def test_plain_folder_refuses_an_adapter(lora_export, tiny_llama, tmp_path):
    _write_fused(tiny_llama, tmp_path / "plain")
    with pytest.raises(ModelError, match="takes no LoRA adapter"):
        check_adapter(
            lora_export.out / "adapters" / "qv.onnx_adapter", tmp_path / "plain" / "model.onnx"
        )


def test_adapter_options_are_checked(tiny_llama, adapters, tmp_path):
    with pytest.raises(EdgeftError, match="cannot take LoRA inputs"):
        export_onnx(tiny_llama, tmp_path / "o", "fp16", adapters={"every": adapters["every"]})
    with pytest.raises(EdgeftError, match="needs the fused graph"):
        export_onnx(tiny_llama, tmp_path / "o", "fp32", graph="optimum", adapters=dict(adapters))
    assert parse_adapters(["a=x/y", "x/z"]) == {"a": Path("x/y"), "z": Path("x/z")}
    with pytest.raises(EdgeftError, match="given twice"):
        parse_adapters(["a=x", "a=y"])
    with pytest.raises(EdgeftError, match="NAME=DIR"):
        parse_adapters(["../a=x"])
    assert not (tmp_path / "o").exists()


def test_bench_measures_the_base_with_each_adapter(lora_export, tmp_path):
    from edgeft.bench.harness import BenchSettings, bench

    files = lora_export.out / "adapters"
    settings = BenchSettings(
        threads=1, prompt_tokens=16, decode_tokens=4, depths=(0,), repeats=1, warmup=0
    )
    results = bench(
        [str(lora_export.out / "fp32")],
        tmp_path / "bench",
        adapters=[files / "every.onnx_adapter", files / "qv.onnx_adapter"],
        settings=settings,
        progress=False,
        log=lambda _: None,
    )
    rows = results["artifacts"]
    assert [r["name"] for r in rows] == ["fp32", "fp32 + every", "fp32 + qv"]
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert rows[0]["adapter"] is None and rows[1]["adapter"].endswith("every.onnx_adapter")
    # the reference is the base: the adapter rows are measurably other models
    kl = [next(iter(r["accuracy"]["vs"].values()))["mean_kl"] for r in rows]
    assert kl[0] < 1e-5 < kl[1] and kl[2] > 1e-5
    assert (
        rows[1]["size_bytes"]
        == rows[0]["size_bytes"] + (files / "every.onnx_adapter").stat().st_size
    )


def test_bundle_ships_adapters_each_with_its_golden_output(lora_export, tmp_path):
    from edgeft.package import MANIFEST, package, verify

    files = lora_export.out / "adapters"
    adapters = [files / "every.onnx_adapter", files / "qv.onnx_adapter"]
    bundle = package(str(lora_export.out / "int4"), tmp_path / "b", "android", lora=adapters)
    manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["model"]["lora"] == ["adapters/every.onnx_adapter", "adapters/qv.onnx_adapter"]
    goldens = [a["golden"]["output_token_ids"] for a in manifest["adapters"]]
    assert manifest["golden"]["output_token_ids"] not in goldens  # the adapters change it
    report = verify(bundle)
    assert report.adapters == 2
    assert report.golden_tokens == sum(
        len(g) for g in [manifest["golden"]["output_token_ids"], *goldens]
    )
    # a golden output that is not what the adapter produces fails, naming the adapter
    manifest["adapters"][0]["golden"]["output_token_ids"] = goldens[1]
    (bundle / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    if goldens[0] != goldens[1]:
        with pytest.raises(EdgeftError, match="with adapters/every.onnx_adapter"):
            verify(bundle)
    # an adapter for another base is refused when packaging
    folder = tmp_path / "other"
    shutil.copytree(lora_export.out / "int4", folder)
    mark_base(folder, "f" * 64)
    with pytest.raises(EdgeftError, match="made for another base"):
        package(str(folder), tmp_path / "b2", "android", lora=adapters)
    assert not (tmp_path / "b2").exists()


def test_inspect_describes_the_adapter_and_the_base(lora_export):
    from edgeft.inspect import inspect_file, render_inspection

    qv = inspect_file(lora_export.out / "adapters" / "qv.onnx_adapter")
    assert qv["format"] == "onnx_adapter" and qv["parameters"] == 28
    assert qv["ranks"] == {4: 4} and qv["empty_modules"] == 10
    assert "rank 4 ×4; 10 empty" in render_inspection(qv)
    base = inspect_file(lora_export.out / "int4")
    assert base["lora"]["modules"] == 14
    assert "LoRA inputs" in render_inspection(base)
