"""What each stage costs as models grow: wall time and peak RSS from 135M to 8B parameters.

Random-weight bf16 checkpoints (as released checkpoints are stored) with the published shapes
of SmolLM2-135M, SmolLM2-360M, Qwen3-0.6B, Llama-3.2-1B, SmolLM2-1.7B, Llama-3.2-3B and
Llama-3.1-8B, every layer built; the tokenizer is the default model's (SmolLM2's, 49152 tokens)
inside each vocabulary; embedding tables are drawn wider (:data:`EMBEDDING_STD`) so that
next-token distributions are peaked as a trained model's are. The checkpoints are written
tensor by tensor, so building one costs its disk space, not its memory. Every stage runs
through the CLI in its own process; its peak RSS is that process's (with any process it
starts, e.g. bench's workers).

Stages, for each shape:

- ``train``: 2 LoRA steps (QLoRA where the fp32 base does not fit this machine), batch 1,
  64-token rows of the shipped cooking data, gradient checkpointing, learning rate 1e-2 so
  that two steps move the weights as far as a real fine-tune's many do (at 2e-4 the delta is
  below bf16's spacing, and merge rightly refuses a bf16 output that lost the adapter);
- ``merge``: into ``--dtype bf16`` (the checkpoint's own precision: an fp32 8B checkpoint
  and its GGUF source do not fit this machine's disk beside the base);
- ``export gguf``: F16, Q8_0 and Q4_K_M (Q4_K_M only from 3B on), each file measured against
  the checkpoint in PyTorch fp32 (streamed layer by layer above a quarter of this machine's
  memory) and in llama.cpp;
- ``export onnx --quant int4`` where asked (``--stages ...,onnx``).

An export asked for without ``merge`` (and no merged checkpoint kept) exports the base
checkpoint, GPTQ calibrated on the same training rows: the same shapes and dtype, so the same
cost; the row says so.

    python benchmarks/scale.py [--only llama-3.2-1b ...] [--stages train,merge,gguf] [--work DIR]

Results are written after every stage to ``results/scale.{md,json}``; a row keeps what earlier
runs measured for stages this run did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from architectures import run  # one CLI stage in its own process
from shapes import PUBLISHED

from edgeft.provenance import machine_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SCALE_MODELS = (
    "smollm2-135m",
    "smollm2-360m",
    "qwen3-0.6b",
    "llama-3.2-1b",
    "smollm2-1.7b",
    "llama-3.2-3b",
    "llama-3.1-8b",
)
SHAPES = {name: PUBLISHED[name] for name in SCALE_MODELS}
STAGES = ("train", "merge", "gguf", "onnx")
# Embedding and output tables are drawn wider than transformers' 0.02 so that next-token
# distributions are peaked, as a trained model's are: with 0.02 they are nearly flat, every
# argmax is a near-tie, and top-1 parity gates measure nothing but rounding. A logit is a
# normalized hidden state against a table row, so its spread grows with √hidden: the std
# shrinks as 1/√hidden to keep the logits of every shape as peaked as the 576-wide
# SmolLM2-135M's at 0.25 (logit std ≈ 6). Rows of hidden > 576 measured before 2026-12-03 23:00
# used 0.25 at every width (times and memory are the same; their KL figures are not comparable).
EMBEDDING_STD = 0.25
EMBEDDING_STD_WIDTH = 576


def embedding_std(hidden_size: int) -> float:
    return EMBEDDING_STD * (EMBEDDING_STD_WIDTH / hidden_size) ** 0.5


def build(name: str, out: Path) -> tuple[Path, int]:
    """A random-weight bf16 checkpoint of ``name``'s shape, written one tensor at a time, with
    the default model's tokenizer. Returns the folder and its parameter count."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from edgeft.models import default_model_dir
    from edgeft.weights import ShardedWriter, encode

    shape = dict(SHAPES[name])
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = AutoConfig.for_model(
        shape.pop("architecture"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
        **shape,
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    params = dict(model.named_parameters())
    if config.tie_word_embeddings:  # one table, stored under the embedding's name
        params.pop("lm_head.weight", None)
    out.mkdir(parents=True)
    writer = ShardedWriter(out, [(n, "BF16", tuple(p.shape)) for n, p in params.items()])
    rng = np.random.default_rng(0)
    for name_, param in params.items():
        if param.ndim == 1:  # norms: ones, as initialized
            values = np.ones(param.shape, dtype=np.float32)
        else:
            values = rng.standard_normal(param.shape, dtype=np.float32)
            table = "embed" in name_ or "lm_head" in name_
            values *= embedding_std(config.hidden_size) if table else 0.02
        writer.write(name_, encode(values, "BF16"))
        del values
    writer.close()
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in params.values())


def training_data(out: Path) -> Path:
    """Rows of the shipped cooking data."""
    from edgeft.demo import dataset_path

    rows = dataset_path("train.jsonl").read_text(encoding="utf-8").splitlines()[:64]
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def fits_fp32(params: int) -> bool:
    """Whether LoRA's fp32 base, its gradients' activations and the optimizer fit here."""
    from edgeft.streaming import total_memory_bytes

    return params * 4 * 2.5 < total_memory_bytes()


def measure(name: str, work: Path, stages: list[str], row: dict) -> dict:
    log = work / "log.txt"
    # In a process of its own: Linux carries a process's peak RSS into the processes it starts
    # (ru_maxrss survives exec), so building here would set every stage's figure below.
    from edgeft.export.onnx import QuantSettings
    from edgeft.isolate import in_child

    base, merged = work / "base", work / "merged"
    # a kept folder (--keep, then --reuse): the stages asked for run again (the 8B base is gone
    # after its merge, for disk: its merged checkpoint counts the parameters)
    kept = base if base.is_dir() else merged if merged.is_dir() and "train" not in stages else None
    if kept:
        from edgeft.weights import checkpoint_params

        params = checkpoint_params(kept)
    else:
        (base, params), _ = in_child(build, name, base, what=f"building {name}")
        row.update(
            params=params, disk_mb=round(sum(f.stat().st_size for f in base.iterdir()) / 1e6)
        )
        save(row)
    data = training_data(work / "data.jsonl")
    method = "lora" if fits_fp32(params) else "qlora"
    adapter = work / "adapter"
    if "train" in stages:
        row["train"] = run(
            [
                "train",
                "--base",
                base,
                "--data",
                data,
                "--out",
                adapter,
                "--method",
                method,
                "--max-steps",
                "2",
                "--batch-size",
                "1",
                "--max-length",
                "64",
                "--gradient-checkpointing",
                "--eval-fraction",
                "0.05",
                "--lr",
                "1e-2",
            ],
            log,
        )
        row["train"]["method"] = method
        save(row)

    def ok(stage: str) -> bool:
        return stage not in row or not row[stage].get("error")

    if "merge" in stages and ok("train"):
        row["merge"] = run(["merge", "--adapter", adapter, "--out", merged, "--dtype", "bf16"], log)
        save(row)
        if params > 5e9:  # disk: the 8B base, merged and BF16 GGUF do not fit 50 GB together
            shutil.rmtree(base)
    # A re-measured export of a big shape whose merged checkpoint is gone exports the base: the
    # same shapes and dtype (bf16), so the same cost; the row says so.
    source = merged if merged.is_dir() or "merge" in stages else base
    if "gguf" in stages and ok("merge"):
        types = "f16,q8_0,q4_k_m" if params < 2.5e9 else "q4_k_m"
        row["gguf"] = run(
            ["export", "gguf", "--model", source, "--out", work / "gguf", "--quant", types], log
        )
        row["gguf"].update(types=types, source=source.name)
        if (work / "gguf" / "edgeft.json").is_file():
            results = json.loads((work / "gguf" / "edgeft.json").read_text())["results"]
            files = results["files"]
            row["gguf"]["files_mb"] = {f["type"]: round(f["bytes"] / 1e6) for f in files}
            # the export's own process, and llama.cpp's measuring each file (the file's cost)
            row["gguf"]["export_rss_mb"] = results.get("peak_rss_mb")
            row["gguf"]["runtime_rss_mb"] = {f["type"]: f.get("runtime_peak_rss_mb") for f in files}
        save(row)
        shutil.rmtree(work / "gguf", ignore_errors=True)
    if "onnx" in stages and ok("merge"):
        shutil.rmtree(work / "onnx", ignore_errors=True)
        row["onnx"] = run(
            ["export", "onnx", "--model", source, "--out", work / "onnx", "--quant", "int4"]
            # the merged checkpoint names its training data, GPTQ's text; the base does not
            + (["--calibration", data] if source == base else []),
            log,
        )
        row["onnx"]["source"] = source.name
        if (work / "onnx" / "edgeft.json").is_file():
            record = json.loads((work / "onnx" / "edgeft.json").read_text())
            (folder,) = record["results"]["folders"]
            row["onnx"].update(
                types="int4",
                file_mb=round(folder["bytes"] / 1e6),
                mean_kl=folder["parity"]["mean_kl"],
                calibration_tokens=record["settings"]["calibration_tokens"],
                kv_cache=QuantSettings(
                    kv_cache=record["settings"]["quantization"]["kv_cache"]
                ).kv_cache_type("int4"),
                # the export's own process, and the one that ran the folder (its cost)
                export_rss_mb=record["results"].get("peak_rss_mb"),
                runtime_rss_mb=folder.get("runtime_peak_rss_mb"),
                notes=record["results"]["notes"],
            )
        save(row)
        shutil.rmtree(work / "onnx", ignore_errors=True)
    return row


_ROWS: dict[str, dict] = {}
COMMAND = "python benchmarks/scale.py " + " ".join(sys.argv[1:])


def save(row: dict) -> None:
    for stage in STAGES:  # which run measured each stage (rows are measured over several runs)
        if stage in row:
            row[stage].setdefault("command", COMMAND)
    _ROWS[row["model"]] = row
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "scale.json"
    previous = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    rows = {r["model"]: r for r in previous["rows"]}
    for name, new in _ROWS.items():
        rows[name] = {**rows.get(name, {}), **new}
    ordered = [rows[n] for n in SHAPES if n in rows]
    document = {
        "machine": machine_summary(),
        "command": COMMAND,
        "rows": ordered,
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "scale.md").write_text(markdown(document), encoding="utf-8")
    plot(document, RESULTS / "scale.png")


def plot(document: dict, path: Path) -> None:
    """Seconds and peak RSS of each stage against parameters, log-log."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 5))
    stages = (
        ("train", "train, 2 steps"),
        ("merge", "merge"),
        ("gguf", "export gguf"),
        ("onnx", "export onnx int4"),
    )
    colors = dict(zip([stage for stage, _ in stages], ["C0", "C1", "C2", "C3"], strict=True))
    for stage, label in stages:
        points = [
            (r["params"], r[stage])
            for r in document["rows"]
            if r.get(stage) and not r[stage].get("error")
        ]
        if not points:
            continue
        params = [p / 1e9 for p, _ in points]
        style = dict(color=colors[stage], label=label)
        time_axis.plot(params, [s["seconds"] for _, s in points], "o-", **style)
        memory_axis.plot(params, [s["peak_rss_mb"] / 1000 for _, s in points], "o-", **style)
        if stage in ("gguf", "onnx"):
            own = [(p / 1e9, s.get("export_rss_mb")) for p, s in points if s.get("export_rss_mb")]
            if own:
                memory_axis.plot(
                    [p for p, _ in own],
                    [m / 1000 for _, m in own],
                    "o--",
                    color=colors[stage],
                    alpha=0.6,
                    label=f"{label}, own process",
                )
    for axis, ylabel in ((time_axis, "seconds"), (memory_axis, "peak RSS, GB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks([0.1, 0.2, 0.5, 1, 2, 5, 10])
        axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("parameters, billions")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    # one legend below both panels: the memory panel's has every series
    handles, labels = memory_axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    figure.suptitle(f"Cost of each stage by model size ({document['machine']})", fontsize=10)
    figure.tight_layout(rect=(0, 0.14, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(document: dict) -> str:
    def cell(stage: dict | None) -> str:
        if not stage:
            return "–"
        if stage.get("error"):
            return f"failed: {stage['error'][:60]}"
        return f"{stage['seconds']:.0f} s, {stage['peak_rss_mb'] / 1000:.2f} GB"

    commands = sorted(
        {r[s]["command"] for r in document["rows"] for s in STAGES if "command" in r.get(s, {})}
    )
    lines = [
        "# Cost of each stage by model size",
        "",
        f"Machine: {document['machine']}. Runs that measured these rows (each stage records "
        "its own in `scale.json`; stages measured before that was recorded show none):",
        "",
        *(f"- `{c}`" for c in commands),
        "",
        "Wall time and peak RSS of each CLI stage in its own process (random-weight bf16 "
        "checkpoints of the published shapes; see `benchmarks/scale.py`). The GGUF export's "
        "peak is that of its process tree: the export itself (streaming) and the llama.cpp "
        "process measuring the largest file (which holds the file: what running it costs) "
        "are given after it. The ONNX int4 export's likewise: its own process (GPTQ streaming "
        "one layer) and the process that ran the folder in onnxruntime and onnxruntime-genai "
        "(the folder plus genai's KV cache for its whole context); the random checkpoints' "
        "KL says nothing about accuracy.",
        "",
        "![time and memory by model size](scale.png)",
        "",
        "| model | parameters | train (2 steps) | merge (bf16) | export gguf | export onnx int4 |",
        "|---|---|---|---|---|---|",
    ]
    for r in document["rows"]:
        train = cell(r.get("train"))
        if r.get("train", {}).get("method") == "qlora":
            train += " (QLoRA)"
        gguf = cell(r.get("gguf"))
        if r.get("gguf", {}).get("types"):
            of_base = ", of the base checkpoint" if r["gguf"].get("source") == "base" else ""
            gguf += f" ({r['gguf']['types']}{of_base})"
        own = r.get("gguf", {}).get("export_rss_mb")
        if own:
            runtime = max(v for v in r["gguf"].get("runtime_rss_mb", {}).values() if v)
            gguf += f"; export {own / 1000:.2f} GB, llama.cpp {runtime / 1000:.2f} GB"
        onnx = cell(r.get("onnx"))
        stage = r.get("onnx") or {}
        if stage.get("calibration_tokens"):
            onnx += f" (GPTQ on {stage['calibration_tokens']} tokens"
            onnx += f", {stage['kv_cache']} KV cache" if stage.get("kv_cache") else ""
            onnx += ", of the base checkpoint)" if stage.get("source") == "base" else ")"
        if stage.get("export_rss_mb") and stage.get("runtime_rss_mb"):
            onnx += (
                f"; export {stage['export_rss_mb'] / 1000:.2f} GB, "
                f"runtimes {stage['runtime_rss_mb'] / 1000:.2f} GB"
            )
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.2f} B | {train} | {cell(r.get('merge'))} | "
            f"{gguf} | {onnx} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(SHAPES), default=None)
    parser.add_argument("--stages", default="train,merge,gguf")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: tmp)")
    parser.add_argument(
        "--keep", action="store_true", help="keep each model's checkpoints (to rerun a stage)"
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="a folder --keep left (one model): run --stages on its checkpoints",
    )
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    names = args.only or list(SHAPES)
    if args.reuse and len(names) != 1:
        parser.error("--reuse takes one model (--only NAME)")
    for name in names:
        work = args.reuse or Path(tempfile.mkdtemp(prefix=f"scale-{name}-", dir=args.work))
        try:
            print(name, measure(name, work, stages, {"model": name}), flush=True)
        finally:
            if not (args.keep or args.reuse):
                shutil.rmtree(work, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
