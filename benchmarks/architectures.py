"""Today's edge families at their real widths: export time and peak memory, file sizes, decode
and prefill speed of GGUF Q4_K_M and ONNX int4 side by side, and what each quantization costs.

Random-weight checkpoints (bf16 safetensors, as released checkpoints are) with the published
shapes of Qwen3-0.6B, Gemma-3-270M, Llama-3.2-1B and Phi-4-mini: every width, head layout,
vocabulary size and quirk as published; the deeper ones cut to fewer layers to fit this
machine's time (each row says how many of how many). The tokenizer is the default model's
(SmolLM2's, 49152 tokens), inside each vocabulary. Every stage runs through the CLI in its own
process; peak RSS is that process's.

- ``export gguf --quant f16,q8_0,q4_k_m`` and ``export onnx --quant int8,int4`` (int4: GPTQ and
  norm tuning on the shipped calibration text): seconds and peak RSS, each file's size, and the
  mean KL against the checkpoint in PyTorch fp32 that the exports measure on the shipped eval
  text (random weights give flat distributions, so the KL figures are small in absolute terms:
  compare them across types, not with a trained model's);
- ``bench`` of the Q4_K_M file and the int4 folder in the same run, at 2 threads: prefill
  tokens/s over a 128-token prompt, decode tokens/s over 64 tokens (medians of 3 runs).

    python benchmarks/architectures.py [--only gemma-3-270m] [--work DIR]

Writes ``results/architectures.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shapes import PUBLISHED

from edgeft.provenance import machine_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# How many layers of each published shape (shapes.py) this benchmark builds.
LAYERS = {"qwen3-0.6b": 8, "gemma-3-270m": 18, "llama-3.2-1b": 4, "phi-4-mini": 2}
SHAPES = {
    name: dict(
        architecture=PUBLISHED[name]["architecture"],
        layers=layers,
        of=PUBLISHED[name]["num_hidden_layers"],
        config={
            k: v
            for k, v in PUBLISHED[name].items()
            if k not in ("architecture", "num_hidden_layers")
        },
    )
    for name, layers in LAYERS.items()
}


def build(name: str, out: Path) -> Path:
    """A random-weight bf16 checkpoint of ``name``'s shape, with the default model's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from edgeft.models import default_model_dir

    shape = SHAPES[name]
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = AutoConfig.for_model(
        shape["architecture"],
        num_hidden_layers=shape["layers"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape["config"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def run(args: list[str], log: Path) -> dict:
    """One CLI stage in its own process: seconds and that process's peak RSS."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ edgeft {' '.join(map(str, args))}\n")
        f.flush()
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeft.cli", "--quiet", *map(str, args)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    # MB = 10**6 bytes, as bench reports them (ru_maxrss is in KiB on Linux)
    result = {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss * 1024 / 1e6)}
    if os.waitstatus_to_exitcode(status) != 0:  # recorded: the row says what failed
        errors = [line for line in log.read_text().splitlines() if "error" in line]
        result["error"] = errors[-1].strip() if errors else f"exit {status}"
    return result


def measure(name: str, work: Path) -> dict:
    shipped = ROOT / "edgeft" / "assets" / "eval"
    model = build(name, work / "model")
    log = work / "log.txt"
    gguf = run(
        ["export", "gguf", "--model", model, "--quant", "f16,q8_0,q4_k_m", "--out", work / "gguf"],
        log,
    )
    onnx = run(
        [
            "export", "onnx", "--model", model, "--quant", "int8,int4", "--out", work / "onnx",
            "--calibration", shipped / "calibration.txt",
        ],
        log,
    )  # fmt: skip
    q4, int4 = work / "gguf" / "model-q4_k_m.gguf", work / "onnx" / "int4"
    artifacts = [a for a in (q4, int4) if a.exists()]
    run(
        [
            "bench", *artifacts, "--out", work / "bench", "--prompt-tokens", "128",
            "--decode-tokens", "64", "--depths", "0", "--repeats", "3", "--threads", "2",
        ],
        log,
    )  # fmt: skip

    def record(folder: Path, key: str) -> list[dict]:
        path = folder / "edgeft.json"
        return json.loads(path.read_text())["results"][key] if path.is_file() else []

    files = {
        row["file"].removeprefix("model-").removesuffix(".gguf"): row
        for row in record(work / "gguf", "files")
    }
    folders = {row["folder"]: row for row in record(work / "onnx", "folders")}
    speed = {}
    for row in json.loads((work / "bench" / "results.json").read_text())["artifacts"]:
        latency = row["latency"]
        speed[row["format"]] = {
            "prefill_tok_s": latency["prefill_tok_s"]["median"],
            "decode_tok_s": latency["decode"][0]["tok_s"]["median"],
        }
    from edgeft.inspect import inspect_safetensors

    parameters = sum(inspect_safetensors(p)["parameter_count"] for p in model.glob("*.safetensors"))
    return {
        "model": name,
        "layers": f"{SHAPES[name]['layers']} of {SHAPES[name]['of']}",
        "checkpoint_mb": round(sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e6),
        "parameters": parameters,
        "export_gguf": gguf,
        "export_onnx": onnx,
        "sizes_mb": {
            **{t: round(r["bytes"] / 1e6, 1) for t, r in files.items()},
            **{t: round(r["bytes"] / 1e6, 1) for t, r in folders.items()},
        },
        "mean_kl": {
            **{t: r["parity"]["mean_kl"] for t, r in files.items()},
            **{t: r["parity"]["mean_kl"] for t, r in folders.items()},
        },
        "speed": speed,
    }


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| model (layers built) | export gguf s / peak MB | export onnx s / peak MB | Q4_K_M MB |"
        " int4 MB | Q4_K_M prefill / decode tok/s | int4 prefill / decode tok/s |"
        " mean KL Q8_0 / Q4_K_M / int8 / int4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    failures = []

    def stage(r: dict, key: str) -> str:
        done = r[key]
        if "error" in done:
            failures.append(f"{r['model']}, {key.replace('_', ' ')}: {done['error']}")
            return f"fails ({len(failures)})"
        return f"{done['seconds']:.0f} / {done['peak_rss_mb']}"

    def speed(r: dict, kind: str) -> str:
        s = r["speed"].get(kind)
        return f"{s['prefill_tok_s']:.0f} / {s['decode_tok_s']:.1f}" if s else "-"

    for r in rows:
        sizes, kl = r["sizes_mb"], r["mean_kl"]
        kls = " / ".join(
            f"{kl[t]:.2g}" if t in kl else "-" for t in ("q8_0", "q4_k_m", "int8", "int4")
        )
        lines.append(
            f"| {r['model']} ({r['layers']}) | {stage(r, 'export_gguf')} | "
            f"{stage(r, 'export_onnx')} | {sizes.get('q4_k_m', '-')} | {sizes.get('int4', '-')} | "
            f"{speed(r, 'gguf')} | {speed(r, 'onnx')} | {kls} |"
        )
    lines += ["", *(f"({i}) {text}" for i, text in enumerate(failures, 1))] if failures else []
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=list(SHAPES))
    parser.add_argument("--work", type=Path, help="keep the checkpoints and exports here")
    args = parser.parse_args()
    names = args.only or list(SHAPES)
    root = args.work or Path(tempfile.mkdtemp(prefix="edgeft-architectures-"))
    previous = RESULTS / "architectures.json"
    kept = json.loads(previous.read_text())["rows"] if previous.is_file() and args.only else []
    command = "python benchmarks/architectures.py" + "".join(
        f" --only {n}" for n in args.only or []
    )
    rows = [r for r in kept if r["model"] not in names]
    for name in names:
        work = root / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        print(f"{name}: building and exporting in {work}", flush=True)
        rows.append(measure(name, work))
        print(json.dumps(rows[-1]), flush=True)
        if not args.work:
            shutil.rmtree(work)
        write(rows, command)  # after each model: a failure later keeps what was measured


def write(rows: list[dict], command: str) -> None:
    rows = sorted(rows, key=lambda r: list(SHAPES).index(r["model"]))
    machine = machine_summary()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "architectures.json").write_text(
        json.dumps({"machine": machine, "command": command, "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "# Today's edge families at their real widths",
        "",
        f"Machine: {machine}. Command: `{command}`; rows measured by earlier runs are kept, and "
        "each reproduces alone with `--only MODEL`. "
        "Random-weight bf16 checkpoints with the published shapes (layers cut where the row "
        "says); every stage through the CLI in its own process; speeds at 2 threads, medians "
        "of 3, Q4_K_M and int4 in the same bench run.",
        "",
        *table(rows),
        "",
    ]
    (RESULTS / "architectures.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
