"""What an importance matrix from the fine-tuning data buys each GGUF type, on the demo's model.

    python benchmarks/gguf_imatrix.py [--demo edgeft-demo] [--work DIR] [--llama-imatrix BIN]

Takes a finished ``edgeft demo`` folder (its merged QLoRA checkpoint, whose provenance names the
fine-tuning data, and its ONNX int4 folder) and makes Q4_K_M, Q4_0, IQ4_XS, IQ3_M and Q2_K
twice from the same F32 conversion: with the importance matrix ``edgeft export gguf --imatrix
auto`` computes on the fine-tuning data, and without one (the low-bit types through
``quantize(require_imatrix=False)``, which ``edgeft export`` refuses). With ``--llama-imatrix``
(llama.cpp's own ``llama-imatrix`` binary, built from the sources the llama-cpp-python sdist
vendors: ``cmake -B build && cmake --build build --target llama-imatrix``), a third set is
quantized with the imatrix it computes from the F32 file over the same fine-tuning rows
(rendered through the chat template, the same number of 512-token chunks). Every file, and the
ONNX int4 folder (GPTQ calibrated on the same data), is measured by ``edgeft bench`` against
the merged model on the shipped cooking text (mean KL, top-1), on the demo's cooking test
questions and by perplexity on a general text, in the same run.

Writes results/gguf_imatrix.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from edgeft.bench import BenchSettings, bench
from edgeft.bench.schema import decode_at
from edgeft.demo import DEMO_BENCH, general_path
from edgeft.export.gguf import export_gguf
from edgeft.export.gguf.imatrix import read_imatrix
from edgeft.export.gguf.quantize import quantize
from edgeft.provenance import machine_summary

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TYPES = ("q4_k_m", "q4_0", "iq4_xs", "iq3_m", "q2_k")
# Answering the 67 test questions: only these (and the ONNX int4), to keep the run short.
TASK_TYPES = ("q4_k_m",)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("edgeft-demo"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeft-imatrix"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-imatrix", type=Path, help="llama.cpp's llama-imatrix binary")
    parser.add_argument(
        "--reuse", action="store_true", help="bench the files an earlier run left in --work"
    )
    parser.add_argument("--no-task", action="store_true", help="answer no test questions")
    args = parser.parse_args()
    merged = args.demo / "merged"
    plain, theirs = args.work / "none", args.work / "llama-imatrix"
    if args.reuse:
        made = json.loads((args.work / "imatrix" / "edgeft.json").read_text())["settings"]
    else:
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        made = export_gguf(
            merged, args.work / "imatrix", ("f32", *TYPES), imatrix="auto", threads=args.threads
        ).__dict__
        source = args.work / "imatrix" / "model-f32.gguf"
        plain.mkdir()
        for quant in TYPES:
            quantize(source, plain / f"model-{quant}.gguf", quant, threads=args.threads,
                     require_imatrix=False)  # fmt: skip
        if args.llama_imatrix:
            theirs.mkdir()
            given = read_imatrix(llama_imatrix(args.llama_imatrix, merged, source, theirs, made))
            for quant in TYPES:
                quantize(source, theirs / f"model-{quant}.gguf", quant, threads=args.threads,
                         imatrix=given)  # fmt: skip
    sets = {"edgeft imatrix": args.work / "imatrix", "none": plain}
    if theirs.is_dir():
        sets["llama-imatrix"] = theirs

    artifacts = {
        str(folder / f"model-{quant}.gguf"): (quant, kind)
        for kind, folder in sets.items()
        for quant in TYPES
    }
    artifacts[str(args.demo / "onnx" / "int4")] = ("int4 (ONNX, GPTQ)", "fine-tuning data")
    settings = BenchSettings(threads=args.threads, **DEMO_BENCH)
    earlier = args.work / "bench" / "results.json"
    if args.reuse and earlier.is_file():
        measured = json.loads(earlier.read_text())
    else:
        measured = bench(
            list(artifacts),
            args.work / "bench",
            references=[merged],
            extra_texts={"general": general_path("test.txt")},
            settings=settings,
            progress=False,
            force=True,
        )
    answering = [a for a, (quant, _) in artifacts.items() if quant in TASK_TYPES or "int4" in quant]
    tasks = {}
    if not args.no_task:
        answered = bench(
            answering,
            args.work / "bench-task",
            references=[],
            task_path=args.demo / "tasks" / "cooking-test.jsonl",
            settings=settings,
            progress=False,
            force=True,
        )
        tasks = dict(zip(answering, answered["artifacts"], strict=True))
    rows = []
    for (path, (quant, kind)), row in zip(artifacts.items(), measured["artifacts"], strict=True):
        accuracy = row.get("accuracy") or {}
        vs = next(iter((accuracy.get("vs") or {}).values()), {})
        task = ((tasks.get(path) or {}).get("accuracy") or {}).get("task") or {}
        decode = decode_at(row.get("latency"))
        rows.append(
            {
                "type": quant,
                "imatrix": kind,
                "status": row["status"],
                "size_mb": row["size_bytes"] / 1e6,
                "mean_kl": vs.get("mean_kl"),
                "top1": vs.get("top1_agreement"),
                "perplexity": accuracy.get("perplexity"),
                "general_perplexity": ((accuracy.get("texts") or {}).get("general") or {}).get(
                    "perplexity"
                ),
                "cooking": task.get("accuracy"),
                "decode_tok_s": decode["tok_s"]["median"] if decode else None,
            }
        )
    record = {
        "machine": machine_summary(),
        "model": str(merged.resolve()),
        "imatrix": made["imatrix"],
        "sets": list(sets),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_imatrix.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / "gguf_imatrix.md").write_text(render(record))
    print(render(record))


def llama_imatrix(binary: Path, merged: Path, f32: Path, work: Path, made) -> Path:
    """Run llama.cpp's own ``llama-imatrix`` on the F32 file over the fine-tuning rows edgeft
    calibrated on (the same shuffled order, as many 512-token chunks)."""
    import random
    import subprocess

    from edgeft.calibration import calibration_texts

    texts, _ = calibration_texts(merged, Path(made["imatrix"]["source"]))
    text = work / "calibration.txt"
    text.write_text("".join(random.Random(0).sample(texts, len(texts))))
    out = work / "imatrix.gguf"
    subprocess.run(
        [str(binary), "-m", str(f32), "-f", str(text), "-o", str(out), "-c", "512",
         "--chunks", str(made["imatrix"]["chunks"]), "-t", "2", "--no-ppl"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return out


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(record: dict) -> str:
    made = record["imatrix"]
    lines = [
        "# GGUF quantization with and without an importance matrix (the demo's model)",
        "",
        f"Machine: {record['machine']}. `python benchmarks/gguf_imatrix.py`. Model: the demo's "
        f"merged QLoRA checkpoint. Importance matrix: {made['tokens']} tokens of "
        f"{Path(made['source']).name} (the fine-tuning data, found through the checkpoint's "
        f"provenance), {made['entries']} tensors. Mean KL and top-1 against the checkpoint in "
        "PyTorch fp32 on the shipped cooking text; cooking: the demo's 67 test questions (Q4_K_M "
        "and int4 only: 67 answers take minutes for each file on a shared 2-core machine); "
        "ppl: perplexity on the cooking text and on general/test.txt; decode: 32 tokens, "
        "2 threads, median of 2, on a shared machine.",
        "",
        "| type | imatrix | size MB | mean KL | top-1 | cooking test | ppl | general ppl | "
        "decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(record["rows"], key=lambda r: (r["type"], r["imatrix"])):
        if r["status"] != "ok":
            lines.append(f"| {r['type']} | {r['imatrix']} | failed | | | | | | |")
            continue
        lines.append(
            f"| {r['type']} | {r['imatrix']} | {r['size_mb']:.1f} | {_f(r['mean_kl'], '.4f')} | "
            f"{_f(r['top1'], '.1%')} | {_f(r['cooking'], '.1%')} | "
            f"{_f(r['perplexity'], '.2f')} | {_f(r['general_perplexity'], '.2f')} | "
            f"{_f(r['decode_tok_s'], '.1f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
