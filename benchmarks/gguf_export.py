"""GGUF export on the default model: conversion cost and file quality, against llama.cpp's own
converter measured in the same run.

    python benchmarks/gguf_export.py --reference-converter PATH/convert_hf_to_gguf.py

Conversion (HF fp32 safetensors → F16 GGUF) runs in a fresh interpreter per repetition, so wall
time includes start-up and imports for both converters alike; peak RSS is the child's own
(``wait4``). The reference converter comes with llama.cpp's sources, for instance from the
llama-cpp-python sdist (``pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:``,
then ``vendor/llama.cpp/convert_hf_to_gguf.py``, run with its ``gguf-py`` on PYTHONPATH).

Quality: every file is measured against the checkpoint in PyTorch fp32 on the shipped cooking
text (mean KL, top-1 agreement, perplexity): edgeft's files as ``edgeft export gguf`` writes
them (quantized from F32), and the reference converter's F16 quantized by the same llama.cpp
quantizer, as llama.cpp's own tools would. Writes ``results/gguf_export.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUANTS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
REFERENCE_QUANTS = ("q8_0", "q4_k_m", "q4_0")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def conversion_costs(model: Path, converter: Path | None, work: Path, repeats: int) -> dict:
    edgeft_cmd = [
        sys.executable,
        "-c",
        "import sys; from edgeft.export.gguf.convert import convert_checkpoint; "
        "convert_checkpoint(sys.argv[1], sys.argv[2], 'f16')",
        str(model),
        str(work / "edgeft-f16.gguf"),
    ]
    runs: dict[str, list[tuple[float, float]]] = {"edgeft": []}
    if converter is not None:
        runs["llama.cpp convert_hf_to_gguf.py"] = []
        ref_cmd = [
            sys.executable,
            str(converter),
            str(model),
            "--outtype",
            "f16",
            "--outfile",
            str(work / "reference-f16.gguf"),
        ]
        ref_env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py")}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        runs["edgeft"].append(run_measured(edgeft_cmd))
        if converter is not None:
            runs["llama.cpp convert_hf_to_gguf.py"].append(run_measured(ref_cmd, ref_env))
    return {
        name: {
            "wall_s_median": round(statistics.median(r[0] for r in rs), 2),
            "wall_s_runs": [round(r[0], 2) for r in rs],
            "peak_rss_mb_median": round(statistics.median(r[1] for r in rs)),
            "peak_rss_mb_runs": [round(r[1]) for r in rs],
        }
        for name, rs in runs.items()
    }


def tensors_identical(a: Path, b: Path) -> bool:
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    return set(ta) == set(tb) and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(ta[n].data, tb[n].data)
        for n in ta
    )


def quality(model: Path, work: Path, threads: int, with_reference: bool) -> dict:
    from edgeft.export.gguf import export_gguf
    from edgeft.export.gguf.export import measure_file
    from edgeft.export.gguf.quantize import quantize
    from edgeft.fidelity import Reference, default_eval_text
    from edgeft.runtimes import get_runtime

    start = time.perf_counter()
    result = export_gguf(model, work / "edgeft", ("f16", *QUANTS), threads=threads)
    export_seconds = time.perf_counter() - start
    rows = {
        f"edgeft {f.type}": {
            "bytes": f.bytes,
            "mean_kl": f.parity.mean_kl,
            "top1": f.parity.top1_agreement,
            "perplexity": f.perplexity,
            "seconds": f.seconds,
            "tensor_types": f.tensor_types,
        }
        for f in result.files
    }
    out = {
        "reference_perplexity": result.reference_perplexity,
        "eval_tokens": result.eval_tokens,
        "tokenizer": result.tokenizer,
        "notes": result.notes,
        "edgeft_export_seconds": round(export_seconds, 1),
        "files": rows,
    }
    if with_reference:
        reference = Reference(
            get_runtime("torch").load(model, threads=threads), default_eval_text()
        )
        source = work / "reference-f16.gguf"
        out["f16_tensors_identical_to_reference"] = tensors_identical(
            work / "edgeft" / "model-f16.gguf", source
        )
        for quant in ("f16", *REFERENCE_QUANTS):
            path = source if quant == "f16" else work / f"reference-{quant}.gguf"
            if quant != "f16":
                quantize(source, path, quant, threads=threads)
            parity, ppl, _ = measure_file(path, reference, threads)
            rows[f"llama.cpp {quant}"] = {
                "bytes": path.stat().st_size,
                "mean_kl": parity.mean_kl,
                "top1": parity.top1_agreement,
                "perplexity": ppl,
            }
    return out


def write_markdown(results: dict, path: Path) -> None:
    m = results["machine"]
    lines = [
        "# GGUF export: SmolLM2-135M-Instruct",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {results['date']}. "
        f"Reproduce: `{results['command']}`.",
        "",
        "## Conversion, HF fp32 safetensors → F16 GGUF (fresh process each run, median of "
        f"{results['repeats']})",
        "",
        "| converter | wall s | peak RSS MB | runs (s) |",
        "|---|---|---|---|",
    ]
    for name, c in results["conversion"].items():
        runs = ", ".join(str(r) for r in c["wall_s_runs"])
        lines.append(f"| {name} | {c['wall_s_median']} | {c['peak_rss_mb_median']} | {runs} |")
    q = results["quality"]
    lines += [
        "",
        f"## Files vs the checkpoint in PyTorch fp32 ({q['eval_tokens']}-token cooking text, "
        f"perplexity {q['reference_perplexity']:.2f})",
        "",
        "| file | size MB | mean KL | top-1 | perplexity |",
        "|---|---|---|---|---|",
    ]
    for name, f in q["files"].items():
        lines.append(
            f"| {name} | {f['bytes'] / 1e6:.0f} | {f['mean_kl']:.4f} | {f['top1']:.1%} | "
            f"{f['perplexity']:.2f} |"
        )
    lines += [
        "",
        f"Token ids identical to the Hugging Face tokenizer on {q['tokenizer']['texts']} texts "
        f"({q['tokenizer']['tokens']} tokens): {not q['tokenizer']['mismatches']}.",
    ]
    if "f16_tensors_identical_to_reference" in q:
        lines.append(
            "F16 tensor data byte-identical to llama.cpp's converter's: "
            f"{q['f16_tensors_identical_to_reference']}."
        )
    lines.append(
        f"Whole `edgeft export gguf` of F16 + {len(QUANTS)} quantizations, with checks: "
        f"{q['edgeft_export_seconds']} s."
    )
    lines += ["", "Notes from the export:", ""] + [f"- {note}" for note in q["notes"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint (default: the embedded SmolLM2)")
    parser.add_argument(
        "--reference-converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from edgeft.models import default_model_dir

    model = args.model or default_model_dir()
    with tempfile.TemporaryDirectory(prefix="edgeft-gguf-bench-") as tmp:
        work = Path(tmp)
        conversion = conversion_costs(model, args.reference_converter, work, args.repeats)
        quality_results = quality(
            model, work, args.threads, with_reference=args.reference_converter is not None
        )
    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/gguf_export.py"
        + (" --reference-converter convert_hf_to_gguf.py" if args.reference_converter else ""),
        "model": str(model.name),
        "repeats": args.repeats,
        "conversion": conversion,
        "quality": quality_results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gguf_export.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out / "gguf_export.md")
    print((args.out / "gguf_export.md").read_text())


if __name__ == "__main__":
    main()
