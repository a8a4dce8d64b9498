"""The repository's top-level rooms install under one namespace, in editable and wheel form."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_rooms_import_under_edgeft_not_top_level(tmp_path):
    code = (
        "import importlib.util, edgeft.runtimes as r, edgeft.export.gguf as g, "
        "edgeft.devices as d; "
        "assert importlib.util.find_spec('runtimes') is None, 'top-level runtimes leaked'; "
        "assert importlib.util.find_spec('export') is None, 'top-level export leaked'; "
        "assert importlib.util.find_spec('devices') is None, 'top-level devices leaked'; "
        "print(r.__file__); print(g.__file__); print(d.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr
    runtimes, gguf, devices = result.stdout.split()
    assert Path(runtimes).parent == ROOT / "runtimes"  # the editable install
    assert Path(gguf).parent == ROOT / "export" / "gguf"
    assert Path(devices).parent == ROOT / "devices"


def test_unknown_runtime_lists_known_ones():
    from edgeft.errors import EdgeftError
    from edgeft.runtimes import get_runtime

    with pytest.raises(
        EdgeftError,
        match="unknown runtime 'x'; choose from: llama.cpp, onnxruntime, onnxruntime-genai, torch",
    ):
        get_runtime("x")


def test_wheel_maps_folders_into_the_edgeft_namespace(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("edgeft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgeft/runtimes/__init__.py" in names and "edgeft/runtimes/pytorch.py" in names
    assert "edgeft/runtimes/llamacpp.py" in names
    assert {
        "edgeft/export/__init__.py",
        "edgeft/export/gguf/convert.py",
        "edgeft/export/onnx/export.py",
        "edgeft/runtimes/onnxrt.py",
    } <= set(names)
    assert {
        "edgeft/devices/__init__.py",
        "edgeft/devices/emulate.py",
        "edgeft/devices/remote.py",
    } <= set(names)
    profiles = {"raspberry-pi-5", "pixel-8", "iphone-15-pro", "jetson-orin-nano", "x86-laptop"}
    assert {f"edgeft/devices/profiles/{name}.toml" for name in profiles} <= set(names)
    assert "edgeft/assets/cooking/train.jsonl" in names
    assert "edgeft/assets/eval/cooking.txt" in names
    tops = {n.split("/")[0] for n in names}
    assert tops == {"edgeft", next(t for t in tops if t.endswith(".dist-info"))}
