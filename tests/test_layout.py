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


# The layers, bottom up: a module may import its own layer and those below it.
TOP = {"cli", "demo", "package", "recommend", "inspect", "bench"}
LAYERS = {"core": 0, "runtimes": 1, "devices": 1, "export": 2, "top": 3}


def _layer_of(module: str) -> str:
    """The layer of ``edgeft.X...``."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else ""
    if head in ("runtimes", "devices", "export"):
        return head
    return "top" if head in TOP else "core"


def _imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "edgeft" or m.startswith("edgeft.")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] != "edgeft":
        parts.insert(0, "edgeft")
    return ".".join(p for p in parts if p != "__init__")


def test_layers_import_one_way():
    """export/ and runtimes/ use edgeft's core, never the reverse; nothing below the CLI, bench,
    package, recommend, inspect and demo imports them (function-level imports included)."""
    offences = []
    for room in ("edgeft", "runtimes", "devices", "export"):
        for path in sorted((ROOT / room).rglob("*.py")):
            module = _module_name(path)
            mine = LAYERS[_layer_of(module)]
            for imported in _imports(path):
                if imported == "edgeft":
                    continue
                if LAYERS[_layer_of(imported)] > mine:
                    offences.append(f"{module} imports {imported}")
    assert offences == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from edgeft.export.gguf import export_gguf\n")
    assert _imports(path) == {"edgeft.export.gguf"}
    assert LAYERS[_layer_of("edgeft.export.gguf")] > LAYERS[_layer_of("edgeft.merge")]
