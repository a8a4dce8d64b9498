"""How much headroom each cross-runtime tolerance of the test suite has, on several kernel paths.

Runs the tests that compare floats across runtimes, kernels and computation orders once per
kernel path, with ``EDGEFT_RECORD_BOUNDS`` set so that ``tests/numerics.py`` records every
measured figure beside its bound, and writes ``results/kernel_paths.{md,json}``:

- ``host``: what this machine picks (llama.cpp as installed, torch's best ATen kernels);
- ``sse42``: llama.cpp built for SSE4.2 only (``make test-kernels`` builds it into
  ``build/llama-sse42``), torch and bitsandbytes on ATen's default kernels, oneDNN and MKL
  without AVX;
- ``cuda-torch`` (with ``--cuda-python``): another interpreter, e.g. a venv with torch's CUDA
  build, on this CPU.

    python benchmarks/kernel_paths.py [--cuda-python /path/to/venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from edgeft.provenance import machine_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TESTS = [
    "tests/test_gguf.py",
    "tests/test_runtime_llamacpp.py",
    "tests/test_train_merge.py",
    "tests/test_onnx.py",
    "tests/test_runtime_onnx.py",
    "tests/test_bench.py",
    "tests/test_architectures.py",
]
SSE42_ENV = {
    "PYTHONPATH": str(ROOT / "build" / "llama-sse42"),
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
}
DESCRIBE = (
    "import llama_cpp, torch; "
    "print(f'torch {torch.__version__}: {torch.backends.cpu.get_cpu_capability()} kernels; '"
    "f'llama.cpp: {llama_cpp.llama_print_system_info().decode().strip(\" |\")}'"
    ".replace(' | ', ', '))"
)


def _avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def run_path(name: str, python: str, env: dict[str, str]) -> dict:
    """Run the tests on one kernel path; return its description, outcome and records."""
    full_env = {**os.environ, **env}
    describe = subprocess.run(
        [python, "-c", DESCRIBE], env=full_env, capture_output=True, text=True, check=True
    ).stdout.strip()
    print(f"{name}: {describe}", flush=True)
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as records:
        full_env["EDGEFT_RECORD_BOUNDS"] = records.name
        start = time.perf_counter()
        tests = subprocess.run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=ROOT,
            env=full_env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        rows = [json.loads(line) for line in records.read().splitlines() if line]
    summary = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr
    print(f"{name}: {summary} ({seconds:.0f} s)", flush=True)
    return {
        "name": name,
        "kernels": describe,
        "env": env,
        "python": python,
        "outcome": summary,
        "returncode": tests.returncode,
        "seconds": round(seconds),
        "records": rows,
    }


def _table(paths: list[dict]) -> list[str]:
    """One row per (test, figure): the bound and, per path, the largest measured value."""
    worst: dict[tuple[str, str, float], dict[str, float]] = defaultdict(dict)
    for path in paths:
        for r in path["records"]:
            # a bound relative to a scale measured on each path agrees to its 3rd digit
            key = (r["test"].split("::", 1)[-1], r["kind"], float(f"{r['bound']:.3g}"))
            worst[key][path["name"]] = max(worst[key].get(path["name"], 0.0), r["measured"])
    names = [p["name"] for p in paths]
    lines = [
        "| test | figure | bound | " + " | ".join(names) + " | least headroom |",
        "|---|---|---:|" + "---:|" * len(names) + "---:|",
    ]
    for test, kind, bound in sorted(worst):
        measured = [worst[(test, kind, bound)].get(n) for n in names]
        shown = [f"{m:.3g}" if m is not None else "" for m in measured]
        if kind.startswith("bug: "):
            least = min(m for m in measured if m is not None) / bound
            headroom = f"bug at {least:.0f}× the bound"
        else:
            top = max(m for m in measured if m is not None)
            headroom = f"{bound / top:.0f}×" if top > 0 else "exact"
        lines.append(f"| {test} | {kind} | {bound:.3g} | " + " | ".join(shown) + f" | {headroom} |")
    return lines


def write(machine: str, paths: list[dict], command: str) -> None:
    """results/kernel_paths.json (every record) and results/kernel_paths.md (the table)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernel_paths.json").write_text(
        json.dumps({"machine": machine, "command": command, "paths": paths}, indent=1) + "\n",
        encoding="utf-8",
    )
    lines = [
        "# Cross-runtime tolerances on several kernel paths",
        "",
        f"Machine: {machine}. Command: `{command}`.",
        "",
        "| path | kernels | tests | time |",
        "|---|---|---|---:|",
        *(f"| {p['name']} | {p['kernels']} | {p['outcome']} | {p['seconds']} s |" for p in paths),
        "",
        "Largest figure measured by each test on each path, against the bound the test asserts",
        "(tests/numerics.py); `bug:` rows are deliberately broken variants, which must land more",
        "than 10× outside their bound.",
        "",
        *_table(paths),
        "",
    ]
    (RESULTS / "kernel_paths.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {RESULTS / 'kernel_paths.md'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-python", help="a Python with torch's CUDA build and edgeft")
    parser.add_argument(
        "--render", action="store_true", help="rewrite the table from results/kernel_paths.json"
    )
    args = parser.parse_args()
    if args.render:
        data = json.loads((RESULTS / "kernel_paths.json").read_text(encoding="utf-8"))
        write(data["machine"], data["paths"], data["command"])
        return 0
    if not (ROOT / "build" / "llama-sse42" / "llama_cpp").is_dir():
        print("build/llama-sse42 is missing: run `make test-kernels` once", file=sys.stderr)
        return 2
    paths = [run_path("host", sys.executable, {}), run_path("sse42", sys.executable, SSE42_ENV)]
    if args.cuda_python:
        paths.append(run_path("cuda-torch", args.cuda_python, {}))
    machine = f"{machine_summary()}, AVX-512: {_avx512()}"
    command = "python benchmarks/kernel_paths.py"
    command += " --cuda-python PY" if args.cuda_python else ""
    write(machine, paths, command)
    return 0 if all(p["returncode"] == 0 for p in paths) else 1


if __name__ == "__main__":
    sys.exit(main())
