"""Memory on the phone: ONNX int4 against llama.cpp Q4_K_M at the same context.

onnxruntime-genai allocates its KV cache for the whole context when it loads a folder; llama.cpp
does too, in F16. For the demo's fine-tuned SmolLM2-135M-Instruct (``edgeft-demo/merged``; the
default model where the demo has not run) and a random-weight Llama-3.2-1B shape, this exports
GGUF Q4_K_M and ONNX int4 (the default int8 KV cache; with ``--fp32-kv`` a second int4 folder
with an fp32 cache), at the 4096-token context both runtimes default to, and runs ``edgeft
bench`` on them in one run (2 threads, decode from depths 0 and 2048, 5 repeats, the checkpoint
as reference): peak RSS of each artifact's process, decode and prefill speed, mean KL against
the checkpoint.

    python benchmarks/phone_memory.py [--only smollm2-135m] [--work DIR] [--fp32-kv]

Writes ``results/phone_memory.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from architectures import run  # one CLI stage in its own process

from edgeft.provenance import machine_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("smollm2-135m", "llama-3.2-1b")


def checkpoint(name: str, work: Path) -> Path:
    if name == "smollm2-135m":  # the demo's fine-tuned model if `edgeft demo` ran here
        demo = ROOT / "edgeft-demo" / "merged"
        if (demo / "edgeft.json").is_file():
            return demo
        from edgeft.models import default_model_dir

        return default_model_dir()
    from scale import build

    from edgeft.isolate import in_child

    return in_child(build, name, work / "base", what=f"building {name}")[0][0]


def measure(name: str, work: Path, fp32_kv: bool) -> dict:
    log = work / "log.txt"
    model = checkpoint(name, work)
    row: dict = {"model": name, "checkpoint": _describe(model)}
    row["gguf_export"] = run(
        ["export", "gguf", "--model", model, "--out", work / "gguf", "--quant", "q4_k_m"], log
    )
    onnx = ["export", "onnx", "--model", model, "--quant", "int4"]
    row["onnx_export"] = run([*onnx, "--out", work / "onnx-int8kv"], log)  # the default cache
    folders = [work / "onnx-int8kv" / "int4"]
    if fp32_kv:
        run([*onnx, "--out", work / "onnx-fp32kv", "--kv-cache", "fp32"], log)
        folders.append(work / "onnx-fp32kv" / "int4")
    row["bench"] = run(
        [
            "bench",
            work / "gguf" / "model-q4_k_m.gguf",
            *folders,
            "--reference",
            model,
            "--out",
            work / "bench",
            "--depths",
            "0,2048",
            "--repeats",
            "5",
            "--threads",
            "2",
        ],
        log,
    )
    for stage in ("gguf_export", "onnx_export", "bench"):
        if row[stage].get("error"):
            raise SystemExit(f"{name}: {stage} failed: {row[stage]['error']} (log: {log})")
    results = json.loads((work / "bench" / "results.json").read_text())
    row["artifacts"] = [
        {
            "name": a["name"],
            "runtime": a.get("runtime"),
            "size_mb": round(a["size_bytes"] / 1e6, 1) if a.get("size_bytes") else None,
            "n_ctx": a.get("context"),
            "peak_rss_mb": (a.get("latency") or {}).get("peak_rss_mb"),
            "mean_kl": next(iter((a.get("accuracy") or {}).get("vs", {}).values()), {}).get(
                "mean_kl"
            ),
            "prefill_tok_s": _median((a.get("latency") or {}).get("prefill_tok_s")),
            "decode_tok_s": {
                str(d["depth"]): _median(d.get("tok_s"))
                for d in (a.get("latency") or {}).get("decode", [])
            },
            "error": a.get("error"),
        }
        for a in results["artifacts"]
    ]
    shutil.copy(work / "bench" / "results.json", RESULTS / f"phone_memory-{name}-bench.json")
    return row


def _describe(model: Path) -> str:
    if model.is_relative_to(ROOT):
        return str(model.relative_to(ROOT))  # the demo's fine-tune
    if model.name == "base":
        return "random weights"
    return f"the default model, {model.name.rsplit('-', 1)[0]}"  # name-<revision>


def _median(stat) -> float | None:
    if isinstance(stat, dict):
        return stat.get("median")
    return stat


def markdown(document: dict) -> str:
    lines = [
        "# ONNX int4 against llama.cpp Q4_K_M at the same context",
        "",
        f"Machine: {document['machine']}. Command: `{document['command']}`.",
        "",
        "Peak RSS of each artifact's bench process over load, prefill and decode at depths 0 "
        "and 2048 (taken before the accuracy pass, whose logits are the harness's own), "
        "context 4096 in both runtimes; onnxruntime-genai is fed prompts in pieces whose "
        "logits fit 32 MiB (128 tokens at a 49k vocabulary, 64 at 128k), llama.cpp in its "
        "512-token batches; 2 threads, medians of 5 runs.",
        "",
        "| model | artifact | size MB | context | peak RSS MB | vs Q4_K_M | prefill tok/s | "
        "decode tok/s (depth 0 / 2048) | mean KL vs checkpoint |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in document["rows"]:
        artifacts = row.get("artifacts", [])
        gguf = next((a for a in artifacts if a["runtime"] == "llama.cpp"), None)
        for a in artifacts:
            ratio = (
                f"{a['peak_rss_mb'] / gguf['peak_rss_mb']:.2f}×"
                if gguf and a.get("peak_rss_mb") and gguf.get("peak_rss_mb")
                else "–"
            )
            decode = " / ".join(
                f"{v:.1f}" if v else "–" for v in a.get("decode_tok_s", {}).values()
            )
            prefill = f"{a['prefill_tok_s']:.0f}" if a.get("prefill_tok_s") else "–"
            kl = f"{a['mean_kl']:.4f}" if a.get("mean_kl") is not None else "–"
            rss = f"{a['peak_rss_mb']:.0f}" if a.get("peak_rss_mb") else "–"
            lines.append(
                f"| {row['model']} ({row.get('checkpoint', '')}) | {a['name']} ({a['runtime']}) | "
                f"{a['size_mb']} | {a['n_ctx']} | {rss} | {ratio} | {prefill} | {decode} | {kl} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=MODELS, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--fp32-kv",
        action="store_true",
        help="also export and bench the int4 folder with an fp32 KV cache (a second GPTQ run)",
    )
    args = parser.parse_args()
    path = RESULTS / "phone_memory.json"
    rows = {r["model"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
    for name in args.only or MODELS:
        work = Path(tempfile.mkdtemp(prefix=f"phone-{name}-", dir=args.work))
        try:
            rows[name] = measure(name, work, args.fp32_kv)
        except BaseException:
            print(f"{name}: kept {work}", flush=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
        document = {
            "machine": machine_summary(),
            "command": "python benchmarks/phone_memory.py " + " ".join(sys.argv[1:]),
            "rows": [rows[n] for n in MODELS if n in rows],
        }
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        (RESULTS / "phone_memory.md").write_text(markdown(document), encoding="utf-8")
        print(markdown(document), flush=True)


if __name__ == "__main__":
    main()
