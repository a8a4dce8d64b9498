"""A native app's view of a bundle: examples/c/edgeft_run.c, built against the llama.cpp that
llama-cpp-python installs, checks a packaged model's sha256 and reproduces its golden output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_model

SOURCE = Path(__file__).resolve().parents[1] / "examples" / "c" / "edgeft_run.c"
# Generous: the tiny model generates 24 tokens in well under a second.
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def edgeft_run(tmp_path_factory) -> Path:
    """The C program, built with the machine's compiler against llama-cpp-python's llama.cpp."""
    name = os.environ.get("CC", "cc")
    compiler = shutil.which(name)
    if compiler is None:
        pytest.skip(f"no C compiler: {name} is not on PATH (set CC to use another)")
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (pip install 'edgeft[gguf]')")
    site = Path(llama_cpp.__file__).resolve().parents[1]
    header, lib = site / "include" / "llama.h", site / "llama_cpp" / "lib"
    if not header.is_file():
        pytest.skip(f"no {header}: this llama-cpp-python build ships no llama.cpp headers")
    if not any(lib.glob("libllama.*")):
        pytest.skip(f"no libllama in {lib}")
    binary = tmp_path_factory.mktemp("c") / "edgeft_run"
    command = [
        compiler,
        "-O2",
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Werror",
        str(SOURCE),
        f"-I{site / 'include'}",
        f"-L{lib}",
        f"-Wl,-rpath,{lib}",
        "-lllama",
        "-lm",
        "-o",
        str(binary),
    ]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(command)}\n{built.stderr}"
    return binary


@pytest.fixture(scope="module")
def bundle(edgeft_run, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A linux-arm64 bundle of a tiny llama exported to F32 GGUF (made after the build, so a
    machine that cannot build skips before exporting)."""
    from edgeft.export.gguf import export_gguf
    from edgeft.package import package

    root = tmp_path_factory.mktemp("c-bundle")
    checkpoint = tiny_model("llama", tiny_tokenizer_dir, root / "merged")
    export_gguf(checkpoint, root / "gguf", ["f32"], threads=1)
    return package(str(root / "gguf" / "model-f32.gguf"), root / "bundle", "linux-arm64", threads=1)


def _run(binary: Path, bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary), str(bundle), "--threads", "1"],
        capture_output=True,
        text=True,
        errors="replace",  # token pieces of a random model need not be whole UTF-8
        timeout=RUN_TIMEOUT_S,
    )


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


def _copy_with_manifest(bundle: Path, target: Path, edit) -> Path:
    shutil.copytree(bundle, target)
    manifest = _manifest(target)
    edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return target


def test_c_program_reproduces_the_golden_output(edgeft_run, bundle):
    golden = _manifest(bundle)["golden"]
    result = _run(edgeft_run, bundle)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sha256 matches the manifest" in result.stdout
    expected = f"golden output reproduced ({len(golden['output_token_ids'])} tokens)"
    assert expected in result.stdout


def test_c_program_refuses_a_modified_model(edgeft_run, bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "tampered")
    model = copy / _manifest(copy)["model"]["path"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight: same size, other hash
    model.write_bytes(bytes(data))
    result = _run(edgeft_run, copy)
    assert result.returncode == 1
    assert "sha256 mismatch" in result.stderr and model.name in result.stderr
    assert "golden" not in result.stdout  # refused before loading


def test_c_program_names_the_first_differing_token(edgeft_run, bundle, tmp_path):
    golden = _manifest(bundle)["golden"]
    output = golden["output_token_ids"]
    at = len(output) // 2

    def edit(manifest):
        ids = manifest["golden"]["output_token_ids"]
        if ids:
            # another token the model knows: one of the prompt's that differs from this one
            ids[at] = next(t for t in golden["prompt_token_ids"] if t != ids[at])
        else:
            ids.append(golden["prompt_token_ids"][0])

    copy = _copy_with_manifest(bundle, tmp_path / "edited", edit)
    result = _run(edgeft_run, copy)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"golden output differs at token {at}" in result.stdout


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["model"].update(path="../model-f32.gguf"), "not a path inside the bundle"),
        (lambda m: m["model"].update(path="/etc/hostname"), "not a path inside the bundle"),
        (lambda m: m["model"].update(path="model/other.gguf"), "no entry in files"),
        (lambda m: m.update(schema="edgeft.bundle/0"), "schema"),
        (lambda m: m["golden"].update(prompt_token_ids=[1, "two"]), "golden.prompt_token_ids"),
    ],
    ids=["dot-dot", "absolute", "unlisted", "schema", "non-integer-id"],
)
def test_c_program_refuses_a_bad_manifest(edgeft_run, bundle, tmp_path, edit, message):
    copy = _copy_with_manifest(bundle, tmp_path / "bad", edit)
    result = _run(edgeft_run, copy)
    assert result.returncode == 1
    assert message in result.stderr


def test_c_program_survives_a_truncated_manifest(edgeft_run, bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "truncated")
    text = (copy / "manifest.json").read_text(encoding="utf-8")
    for cut in (1, len(text) // 3, len(text) // 2, len(text) - 3):
        (copy / "manifest.json").write_text(text[:cut], encoding="utf-8")
        result = _run(edgeft_run, copy)
        assert result.returncode == 1, f"cut at {cut}: {result.stdout}{result.stderr}"
        assert "manifest.json:" in result.stderr
