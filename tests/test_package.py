"""edgeft package / verify: bundles for apps, and every way a bundle can be damaged."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
from conftest import tiny_model

from edgeft.bench.harness import BenchSettings, bench
from edgeft.cli import EXIT_USER_ERROR, main
from edgeft.errors import EdgeftError
from edgeft.package import MANIFEST, SCHEMA, package, verify


@pytest.fixture(scope="module")
def exports(tiny_tokenizer_dir, tmp_path_factory):
    from edgeft.export.gguf import export_gguf
    from edgeft.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("package")
    checkpoint = tiny_model("llama", tiny_tokenizer_dir, root / "merged")
    export_gguf(checkpoint, root / "gguf", ["f32", "q8_0"], threads=1)
    export_onnx(checkpoint, root / "onnx", ["fp32"], threads=1)
    return {
        "checkpoint": checkpoint,
        "gguf": root / "gguf" / "model-q8_0.gguf",
        "f32": root / "gguf" / "model-f32.gguf",
        "onnx": root / "onnx" / "fp32",
    }


@pytest.fixture(scope="module")
def bundle(exports, tmp_path_factory):
    return package(
        str(exports["gguf"]), tmp_path_factory.mktemp("b") / "bundle", "android", threads=1
    )


def _copy(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_gguf_bundle_holds_what_an_app_needs_and_verifies(bundle, exports):
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["schema"] == SCHEMA and manifest["target"] == "android"
    assert manifest["runtime"]["name"] == "llama.cpp" and manifest["runtime"]["min_version"]
    assert manifest["model"] == {
        "format": "gguf",
        "quant": "q8_0",
        "path": "model/model-q8_0.gguf",
        "lora": [],
    }
    paths = {entry["path"] for entry in manifest["files"]}
    assert {"model/model-q8_0.gguf", "tokenizer/tokenizer.json", "generation.json"} <= paths
    model_entry = next(e for e in manifest["files"] if e["path"] == "model/model-q8_0.gguf")
    assert model_entry["size"] == exports["gguf"].stat().st_size
    assert manifest["provenance"]["source_weights_sha256"]
    assert manifest["quantization"]["type"] == "q8_0"
    assert manifest["quantization"]["tensor_types"]
    golden = manifest["golden"]
    assert golden["prompt_token_ids"] and golden["output_token_ids"]
    assert manifest["tokenizer"]["eos_token_ids"]
    report = verify(bundle, threads=1)
    assert report.files == len(manifest["files"])
    assert report.golden_tokens == len(golden["output_token_ids"])


def test_onnx_bundle_and_zip_verify(exports, tmp_path):
    path = package(str(exports["onnx"]), tmp_path / "onnx.zip", "ios", make_zip=True, threads=1)
    assert path.suffix == ".zip" and zipfile.is_zipfile(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read(MANIFEST))
    assert manifest["runtime"]["name"] == "onnxruntime-genai"
    assert "model/genai_config.json" in {e["path"] for e in manifest["files"]}
    # the session reads the start token from genai_config.json, as the GGUF's from its metadata
    genai = json.loads((exports["onnx"] / "genai_config.json").read_text())
    assert manifest["tokenizer"]["bos_token_id"] == genai["model"]["bos_token_id"] is not None
    assert verify(path, threads=1).golden_tokens == len(manifest["golden"]["output_token_ids"])


def test_one_byte_changed_fails_verify(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    model = copy / "model" / "model-q8_0.gguf"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(EdgeftError, match=r"model/model-q8_0\.gguf: sha256 does not match"):
        verify(copy, load=False)


def test_missing_extra_and_truncated_files_fail_verify(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    (copy / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(EdgeftError, match="tokenizer/tokenizer.json: listed in the manifest but"):
        verify(copy, load=False)
    copy = _copy(bundle, tmp_path / "2")
    (copy / "model" / "extra.gguf").write_bytes(b"GGUF")
    with pytest.raises(EdgeftError, match="model/extra.gguf: in the bundle but not in"):
        verify(copy, load=False)
    copy = _copy(bundle, tmp_path / "3")
    gen = copy / "generation.json"
    gen.write_bytes(gen.read_bytes()[:-3])
    with pytest.raises(EdgeftError, match="generation.json: .* bytes, the manifest says"):
        verify(copy, load=False)


def test_edited_manifest_fails_verify(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    expected = manifest["golden"]["output_token_ids"]
    manifest["golden"]["output_token_ids"] = [(expected[0] + 1) % 50, *expected[1:]]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EdgeftError, match="golden output differs at token 0"):
        verify(copy, threads=1)
    manifest["golden"]["output_token_ids"] = expected
    manifest["files"][0]["path"] = "../outside"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EdgeftError, match="leaves the bundle"):
        verify(copy, load=False)
    manifest["files"][0]["path"] = "model/model-q8_0.gguf"
    del manifest["golden"]["output_token_ids"]
    manifest["runtime"]["name"] = "llama.cpp"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(EdgeftError, match=r"golden\.output_token_ids: field required"):
        verify(copy, load=False)
    (copy / MANIFEST).write_text('{"schema": "something else"}')
    with pytest.raises(EdgeftError, match="schema 'something else' is not 'edgeft.bundle/1'"):
        verify(copy, load=False)


def test_zip_with_a_path_outside_is_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../escaped.txt", "x")
        archive.writestr(MANIFEST, "{}")
    with pytest.raises(EdgeftError, match="would land outside the bundle"):
        verify(evil, load=False)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_bench_figures_go_into_the_manifest(exports, tmp_path):
    settings = BenchSettings(
        threads=1, prompt_tokens=8, decode_tokens=2, depths=(0,), repeats=1, warmup=0
    )
    results = bench(
        [str(exports["gguf"])],
        tmp_path / "bench",
        settings=settings,
        log=lambda _: None,
        progress=False,
    )
    path = package(
        str(exports["gguf"]),
        tmp_path / "b",
        "linux-arm64",
        bench_results=tmp_path / "bench" / "results.json",
        threads=1,
    )
    figures = json.loads((path / MANIFEST).read_text())["bench"]
    assert figures["results_created"] == results["created"]
    assert figures["figures"]["decode_tok_s_by_depth"]["0"] > 0
    assert figures["figures"]["vs"]  # KL against the checkpoint the GGUF came from
    with pytest.raises(EdgeftError, match="no row for this artifact"):
        package(
            str(exports["f32"]),
            tmp_path / "b2",
            "android",
            bench_results=tmp_path / "bench" / "results.json",
        )
    assert not (tmp_path / "b2").exists()


def test_bad_requests_are_clear_errors(exports, bundle, tmp_path, capsys):
    code = main(
        ["package", str(exports["checkpoint"]), "--target", "ios", "--out", str(tmp_path / "x")]
    )
    assert code == EXIT_USER_ERROR
    assert "does not run on phones" in capsys.readouterr().err
    code = main(["package", str(exports["gguf"]), "--target", "android", "--out", str(bundle)])
    assert code == EXIT_USER_ERROR
    assert "--force" in capsys.readouterr().err
    copy = _copy(bundle, tmp_path)
    (copy / "generation.json").write_text("{}")
    assert main(["verify", str(copy), "--no-load"]) == EXIT_USER_ERROR
    assert "generation.json" in capsys.readouterr().err
    assert main(["verify", str(bundle), "--threads", "1"]) == 0
    assert "golden output reproduced" in capsys.readouterr().out
