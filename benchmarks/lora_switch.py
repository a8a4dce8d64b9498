"""One base on the device, two adapters swapped at run time: onnxruntime-genai and llama.cpp.

    python benchmarks/lora_switch.py [--demo edgeft-demo] [--work DIR] [--rounds 15] [--reuse]

Takes a finished ``edgeft demo`` folder's two adapters of the same base (its QLoRA and LoRA
fine-tunings) and exports:

* ``edgeft export onnx --adapter qlora=… --adapter lora=…`` over the base: fp32 and int4 base
  folders with LoRA inputs and ``adapters/{qlora,lora}.onnx_adapter`` (int4 GPTQ-calibrated
  on the adapters' fine-tuning data); the export itself measures base + each adapter in
  onnxruntime and onnxruntime-genai against the adapter in PyTorch;
* ``edgeft export gguf`` of the base (Q4_K_M, importance matrix on the same data) and
  ``edgeft export gguf-lora`` of each adapter (F16) over it.

Then, in each runtime, one session of the 4-bit base measures in paired rounds: the time to
apply an adapter (``set_adapter``: onnxruntime-genai's ``set_active_adapter``, llama.cpp's
``llama_set_adapters_lora``) and the time to the first answer token of a chat prompt right
after switching to the other adapter, against the same prompt with the adapter unchanged
(each round does both, in alternating order). Also: reading each adapter file the first
time, and loading the base itself (what switching by reloading a merged model would cost).

Last, the int4 base and both adapters go through ``edgeft bench --adapter`` (the demo's
cooking test questions, against the merged QLoRA model) and ``edgeft package --lora`` +
``edgeft verify``.

Writes results/lora_switch.{md,json} and the bench report results/lora_switch-bench.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from edgeft.bench.stats import percentile
from edgeft.bench.worker import first_token_s
from edgeft.export.gguf import export_gguf, export_gguf_lora
from edgeft.export.onnx import export_onnx
from edgeft.merge import read_adapter, recorded_base
from edgeft.provenance import machine_summary
from edgeft.runtimes import get_runtime

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT = "How long should I rest a steak after grilling, and why?"
ADAPTERS = {"qlora": "adapter", "lora": "adapter-lora"}


def quartiles(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "q1": percentile(values, 25),
        "q3": percentile(values, 75),
    }


def export(demo: Path, work: Path, threads: int) -> dict:
    adapters = {name: demo / folder for name, folder in ADAPTERS.items()}
    record, _, _ = read_adapter(adapters["qlora"])
    base = recorded_base(record).path
    data = Path(record["inputs"]["data"]["path"])
    start = time.perf_counter()
    onnx = export_onnx(
        base,
        work / "onnx",
        "fp32,int4",
        calibration=data,
        adapters=adapters,
        threads=threads,
        force=True,
        progress=print,
    )
    onnx_s = time.perf_counter() - start
    gguf = export_gguf(base, work / "gguf", "q4_k_m", calibration=data, threads=threads, force=True)
    base_gguf = work / "gguf" / "model-q4_k_m.gguf"
    loras = {}
    for name, adapter in adapters.items():
        loras[name] = export_gguf_lora(
            adapter, work / f"gguf-lora-{name}", base_gguf=base_gguf, threads=threads, force=True
        )
    return {
        "base": str(base),
        "calibration": str(data),
        "onnx_seconds": round(onnx_s, 1),
        "onnx_adapters": [a.as_dict() for a in onnx.adapters],
        "onnx_folders": [
            {"folder": f.folder, "bytes": f.bytes, "parity": f.parity.as_dict()}
            for f in onnx.folders
        ],
        "gguf_bytes": base_gguf.stat().st_size,
        "gguf_imatrix": gguf.imatrix is not None,
        "gguf_lora": {
            name: {
                "file": str(result.file),
                "bytes": result.file.stat().st_size,
                "parity": result.parity.as_dict(),
                "gated": result.gated,
            }
            for name, result in loras.items()
        },
    }


def switching(runtime: str, base: Path, files: dict[str, Path], rounds: int, threads: int):
    """Paired rounds in one session of ``base``: apply time, and time to the first token
    after a switch against after no switch."""
    start = time.perf_counter()
    session = get_runtime(runtime).load(base, threads=threads)
    load_s = time.perf_counter() - start
    try:
        ids = session.tokenize(PROMPT, chat=True)
        first_read = {}
        for name, path in files.items():  # the first application reads the file
            start = time.perf_counter()
            session.set_adapter(path)
            first_read[name] = time.perf_counter() - start
        names = list(files)
        current = names[0]
        session.set_adapter(files[current])
        first_token_s(session, ids)  # warm-up
        apply_s, switched, same = [], [], []
        for i in range(rounds):
            order = ("switch", "same") if i % 2 == 0 else ("same", "switch")
            for kind in order:
                if kind == "switch":
                    current = names[(names.index(current) + 1) % len(names)]
                start = time.perf_counter()
                session.set_adapter(files[current])
                applied = time.perf_counter() - start
                ttft = first_token_s(session, ids)
                if kind == "switch":
                    apply_s.append(applied)
                    switched.append(ttft + applied)
                else:
                    same.append(ttft + applied)
        answers = {}
        for name, path in files.items():  # the adapters really differ
            session.set_adapter(path)
            from edgeft.session import generate

            answers[name] = session.detokenize(generate(session, ids, 24))
    finally:
        session.close()
    extra = [s - u for s, u in zip(switched, same, strict=True)]
    return {
        "base_load_s": load_s,
        "prompt_tokens": len(ids),
        "first_read_s": first_read,
        "apply_ms": {k: v * 1000 for k, v in quartiles(apply_s).items()},
        "first_token_after_switch_ms": {k: v * 1000 for k, v in quartiles(switched).items()},
        "first_token_unchanged_ms": {k: v * 1000 for k, v in quartiles(same).items()},
        "switch_cost_ms": {k: v * 1000 for k, v in quartiles(extra).items()},
        "answers": answers,
    }


def bench_and_package(demo: Path, work: Path, files: dict[str, Path], threads: int) -> dict:
    """The int4 base with each adapter through edgeft bench, then one bundle with both."""
    from edgeft.bench import BenchSettings, bench
    from edgeft.package import package, verify

    out = work / "bench"
    results = bench(
        [str(work / "onnx" / "int4")],
        out,
        references=[demo / "merged"],
        task_path=demo / "tasks" / "cooking-test.jsonl",
        adapters=list(files.values()),
        settings=BenchSettings(threads=threads, depths=(0,)),
        force=True,
        log=print,
    )
    bundle = package(
        str(work / "onnx" / "int4"),
        work / "bundle",
        "android",
        lora=list(files.values()),
        bench_results=out / "results.json",
        force=True,
    )
    report = verify(bundle)
    rows = {
        row["name"]: {
            "size_bytes": row["size_bytes"],
            "task_accuracy": (row["accuracy"].get("task") or {}).get("accuracy"),
            "mean_kl_vs_merged_qlora": next(iter(row["accuracy"]["vs"].values()))["mean_kl"],
            "decode_tok_s": row["latency"]["decode"][0]["tok_s"]["median"],
        }
        for row in results["artifacts"]
    }
    (RESULTS / "lora_switch-bench.md").write_text((out / "report.md").read_text())
    return {
        "rows": rows,
        "bundle_files": report.files,
        "bundle_adapters": report.adapters,
        "golden_tokens_verified": report.golden_tokens,
    }


def render(results: dict) -> str:
    made = results["export"]
    lines = [
        "# Swapping LoRA adapters over one base: onnxruntime-genai and llama.cpp",
        "",
        f"Machine: {results['machine']}, {results['threads']} threads. Base: "
        f"{Path(made['base']).name}; adapters: the demo's QLoRA and LoRA fine-tunings. "
        f"{results['rounds']} paired rounds; median [quartiles]. Command: "
        "`python benchmarks/lora_switch.py`.",
        "",
        "## Base + adapter against the adapter in PyTorch (edgeft export onnx --adapter)",
        "",
        "| Adapter | File | Folder | Mean KL | Top-1 | genai tokens |",
        "|---|---|---|---|---|---|",
    ]
    for adapter in made["onnx_adapters"]:
        for folder in adapter["folders"]:
            lines.append(
                f"| {adapter['name']} | {adapter['bytes'] / 1e6:.2f} MB | {folder['folder']} | "
                f"{folder['parity']['mean_kl']:.2e} | {folder['parity']['top1_agreement']:.1%} | "
                f"{'same' if folder['genai_greedy_identical'] else 'other'} |"
            )
    for name, lora in made["gguf_lora"].items():
        lines.append(
            f"| {name} | {lora['bytes'] / 1e6:.2f} MB (LoRA GGUF F16) | Q4_K_M | "
            f"{lora['parity']['mean_kl']:.2e} | {lora['parity']['top1_agreement']:.1%} | — |"
        )
    lines += [
        "",
        "## Switching in one session of the 4-bit base",
        "",
        "| Runtime | Base load | First read of an adapter | Apply | First token after a "
        "switch | Unchanged | Switch cost |",
        "|---|---|---|---|---|---|---|",
    ]

    def q(figure: dict) -> str:
        return f"{figure['median']:.2f} [{figure['q1']:.2f}, {figure['q3']:.2f}] ms"

    for runtime, row in results["switching"].items():
        reads = ", ".join(f"{n} {s * 1000:.0f} ms" for n, s in row["first_read_s"].items())
        lines.append(
            f"| {runtime} | {row['base_load_s'] * 1000:.0f} ms | {reads} | {q(row['apply_ms'])} "
            f"| {q(row['first_token_after_switch_ms'])} | {q(row['first_token_unchanged_ms'])} "
            f"| {q(row['switch_cost_ms'])} |"
        )
    prompt_tokens = next(iter(results["switching"].values()))["prompt_tokens"]
    lines += [
        "",
        f"First token: the {prompt_tokens}-token chat prompt prefilled from an empty cache and "
        "one token decoded, the apply call included; switch cost: after a switch minus "
        "unchanged, paired by round.",
        "",
        "Greedy answers with each adapter (24 tokens):",
        "",
    ]
    for runtime, row in results["switching"].items():
        for name, text in row["answers"].items():
            lines.append(f"- {runtime}, {name}: {text!r}")
    packaged = results["bench_and_package"]
    lines += [
        "",
        "## edgeft bench --adapter and edgeft package --lora",
        "",
        "The int4 base alone and with each adapter, on the demo's 67 cooking test questions, "
        "KL against the merged QLoRA model ([lora_switch-bench.md](lora_switch-bench.md)):",
        "",
        "| Row | Size | Cooking test | Mean KL vs merged QLoRA | Decode tok/s |",
        "|---|---|---|---|---|",
    ]
    for name, row in packaged["rows"].items():
        accuracy = row["task_accuracy"]
        lines.append(
            f"| {name} | {row['size_bytes'] / 1e6:.1f} MB | "
            f"{'—' if accuracy is None else f'{accuracy:.1%}'} | "
            f"{row['mean_kl_vs_merged_qlora']:.3f} | {row['decode_tok_s']:.1f} |"
        )
    lines += [
        "",
        f"One Android bundle holds the base and both adapters: `edgeft verify` checked "
        f"{packaged['bundle_files']} files, {packaged['bundle_adapters']} adapters' base, and "
        f"reproduced {packaged['golden_tokens_verified']} golden tokens (the base's and each "
        "adapter's).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("edgeft-demo"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeft-lora-switch"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="time the files in --work again")
    args = parser.parse_args()
    made_file = args.work / "made.json"
    if args.reuse and made_file.is_file():
        made = json.loads(made_file.read_text())
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        made = export(args.demo, args.work, args.threads)
        made_file.write_text(json.dumps(made, indent=2, default=str))
    onnx_files = {n: args.work / "onnx" / "adapters" / f"{n}.onnx_adapter" for n in ADAPTERS}
    gguf_files = {n: Path(made["gguf_lora"][n]["file"]) for n in ADAPTERS}
    results = {
        "machine": machine_summary(),
        "threads": args.threads,
        "rounds": args.rounds,
        "export": made,
        "switching": {
            "onnxruntime-genai (int4)": switching(
                "onnxruntime-genai",
                args.work / "onnx" / "int4",
                onnx_files,
                args.rounds,
                args.threads,
            ),
            "llama.cpp (Q4_K_M)": switching(
                "llama.cpp",
                args.work / "gguf" / "model-q4_k_m.gguf",
                gguf_files,
                args.rounds,
                args.threads,
            ),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    results["bench_and_package"] = bench_and_package(args.demo, args.work, onnx_files, args.threads)
    (RESULTS / "lora_switch.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / "lora_switch.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
