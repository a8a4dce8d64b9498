"""Int4 ONNX recipes side by side: which layout meets the speed goal against onnxruntime-genai's
builder int4 at what accuracy, chosen on a dev half of the held-out text.

    python benchmarks/onnx_int4_recipes.py --model edgeft-demo/merged [--work DIR] [--repeats 30]

Each recipe is ``edgeft export onnx --quant int4`` with its own options (see ``RECIPES``),
exported once into ``--work`` (an existing folder there is reused, so a study can be resumed
or extended); the builder's int4 is built as in ``onnx_export.py``, and llama.cpp's Q4_K_M
comes from ``edgeft export gguf``.

Speed: 2 threads, a 256-token prompt then 128 greedy tokens, every artifact once per round in
an order that rotates, and each recipe's prefill and decode read as the median (quartiles) of
its per-round ratios to the builder's int4. Accuracy: mean KL and top-1 against the checkpoint
in PyTorch fp32 on the first half of the held-out cooking chat (the dev half, about 2k tokens);
the other half is left for ``onnx_export.py``'s report of the recipe chosen here. Writes
``results/onnx_int4_recipes.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gguf_export import machine
from onnx_builder_reference import DEFAULT_VENV, ensure_builder_venv, run_builder
from onnx_export import (
    folder_bytes,
    heldout_chunks,
    speed_row,
    speeds,
    weighted,
    with_our_tokenizer,
)

HERE = Path(__file__).resolve().parent

# name → extra options of `edgeft export onnx --quant int4`.
RECIPES = {
    "default": [],
    "gate/up 64": ["--module-blocks", "gate_proj=64,up_proj=64"],
    "gate/up 64, down 128": ["--module-blocks", "gate_proj=64,up_proj=64,down_proj=128"],
    "symmetric": ["--symmetric"],
    "gate/up 64, down 128, symmetric": [
        "--module-blocks",
        "gate_proj=64,up_proj=64,down_proj=128",
        "--symmetric",
    ],
    "default, fp32 KV cache": ["--kv-cache", "fp32"],
    "q/k/v 8-bit, gate/up 64": [
        "--int8-modules",
        "q_proj,k_proj,v_proj",
        "--module-blocks",
        "gate_proj=64,up_proj=64",
    ],
    "q/k/v 8-bit, gate/up 64, symmetric": [
        "--int8-modules",
        "q_proj,k_proj,v_proj",
        "--module-blocks",
        "gate_proj=64,up_proj=64",
        "--symmetric",
    ],
    "all 4-bit, symmetric": ["--int8-modules", "", "--symmetric"],
}
BUILDER = "genai builder int4"
Q4_K_M = "llama.cpp q4_k_m"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def export(model: Path, folder: Path, options: list[str]) -> float | None:
    """Export one recipe unless its folder is there; wall seconds (None when reused)."""
    if (folder / "int4" / "genai_config.json").is_file():
        return None
    command = ["edgeft", "export", "onnx", "--model", str(model), "--quant", "int4"]
    command += ["--out", str(folder), "--force", *options]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def dev_accuracy(path: Path, runtime: str, chunks: list, references: list) -> dict:
    from edgeft.parity import compare_logits
    from edgeft.runtimes import get_runtime

    session = get_runtime(runtime).load(path, threads=2)
    try:
        parities = [
            compare_logits(ref, session.logits(ids))
            for ids, ref in zip(chunks, references, strict=True)
        ]
    finally:
        session.close()
    return {
        "dev_mean_kl": weighted(parities, "mean_kl"),
        "dev_top1": weighted(parities, "top1_agreement"),
    }


def commit() -> str:
    """The commit the recipes were exported from (``+`` when the tree had changes)."""
    run = {"capture_output": True, "text": True, "cwd": HERE}
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "edgeft", "export"], **run)
    return head + ("+" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("edgeft-demo/merged"))
    parser.add_argument("--work", type=Path, default=Path("int4-recipes"))
    parser.add_argument("--builder-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--only", action="append", choices=list(RECIPES), help="recipes to run")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="onnx_int4_recipes", help="results file stem")
    args = parser.parse_args()
    recipes = {name: RECIPES[name] for name in args.only or RECIPES}
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a checkpoint; run `make demo` first or pass --model")

    from edgeft.export.gguf import export_gguf
    from edgeft.fidelity import default_eval_text
    from edgeft.runtimes import get_runtime

    model = args.model.resolve()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    export_seconds = {}
    for name, options in recipes.items():
        export_seconds[name] = export(model, work / slug(name), options)
    ensure_builder_venv(args.builder_venv)
    builder_folder = work / "builder" / "int4"
    if not (builder_folder / "genai_config.json").is_file():
        (work / "builder").mkdir(exist_ok=True)
        run_builder(args.builder_venv / "bin" / "python", model, work / "builder", "int4")
    gguf = work / "gguf" / "model-q4_k_m.gguf"
    if not gguf.is_file():
        export_gguf(model, work / "gguf", ("q4_k_m",))
    view = work / f"view-{builder_folder.name}"
    if not view.exists():
        with_our_tokenizer(builder_folder, model, work)

    # The builder sits in the middle of the rotating order, so every recipe is its neighbour
    # within a few seconds in some rounds.
    names = list(recipes)
    half = len(names) // 2
    artifacts = {n: ("onnxruntime-genai", work / slug(n) / "int4") for n in names[:half]}
    artifacts[BUILDER] = ("onnxruntime-genai", view)
    artifacts.update({n: ("onnxruntime-genai", work / slug(n) / "int4") for n in names[half:]})
    artifacts[Q4_K_M] = ("llama.cpp", gguf)

    torch_session = get_runtime("torch").load(model, threads=2)
    prompt = torch_session.tokenize(default_eval_text() * 3)[: args.prompt_tokens]
    chunks = heldout_chunks(model)
    dev = chunks[: len(chunks) // 2]
    references = [torch_session.logits(chunk) for chunk in dev]
    torch_session.close()

    runs = speeds(artifacts, prompt, args.new_tokens, args.repeats)
    rows = {}
    for name, (runtime, path) in artifacts.items():
        logits_runtime = "onnxruntime" if runtime == "onnxruntime-genai" else runtime
        rows[name] = {
            "options": RECIPES.get(name),
            "export_seconds": export_seconds.get(name),
            "bytes": folder_bytes(path),
            **speed_row(runs, name, BUILDER),
            **dev_accuracy(path, logits_runtime, dev, references),
        }
        print(name, rows[name], flush=True)
    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/onnx_int4_recipes.py", *sys.argv[1:]]),
        "commit": commit(),
        "settings": {
            "threads": 2,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "dev_tokens": sum(len(c) for c in dev),
        },
        "artifacts": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out / f"{args.name}.md")
    print((args.out / f"{args.name}.md").read_text())


def write_markdown(results: dict, path: Path) -> None:
    m, s = results["machine"], results["settings"]
    lines = [
        "# Int4 ONNX recipes against onnxruntime-genai's builder int4",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {results['date']}; exported at commit "
        f"{results['commit']}. Reproduce: `{results['command']}`.",
        "",
        f"Speed: {s['threads']} threads, {s['prompt_tokens']}-token prompt then "
        f"{s['new_tokens']} greedy tokens, {s['repeats']} rounds, every artifact once per round "
        "in a rotating order; ratios are the median (quartiles) of per-round ratios to the "
        f"builder's int4. Accuracy: mean KL and top-1 against the checkpoint in PyTorch fp32 on "
        f"the dev half of the held-out cooking chat ({s['dev_tokens']} tokens).",
        "",
        "| recipe | options | size MB | prefill tok/s | decode tok/s | prefill vs builder "
        "| decode vs builder | dev KL | dev top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["artifacts"].items():
        options = " ".join(r["options"]) if r["options"] else ("–" if r["options"] is None else "")
        p1, p3 = r["prefill_vs_builder_int4_quartiles"]
        d1, d3 = r["decode_vs_builder_int4_quartiles"]
        lines.append(
            f"| {name} | `{options}` | {r['bytes'] / 1e6:.1f} | {r['prefill_tok_s']:.0f} | "
            f"{r['decode_tok_s']:.0f} | {r['prefill_vs_builder_int4']:.3f} ({p1:.2f}–{p3:.2f}) | "
            f"{r['decode_vs_builder_int4']:.3f} ({d1:.2f}–{d3:.2f}) | {r['dev_mean_kl']:.4f} | "
            f"{r['dev_top1']:.1%} |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
