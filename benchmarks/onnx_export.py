"""ONNX export of a merged checkpoint against onnxruntime-genai's model builder and llama.cpp,
measured side by side in one run.

    python benchmarks/onnx_export.py --model edgeft-demo/merged

- edgeft: ``edgeft export onnx`` fp32, int8, int4 (default settings, fused graph), and the
  int4 recipes of ``INT4_VARIANTS`` (the previous default: zero points, 4-bit blocks of 32
  and 8-bit blocks of 64);
- onnxruntime-genai's builder, int4 and int8, built in its own virtual environment (it needs
  transformers 5; see ``onnx_builder_reference.py``);
- llama.cpp Q8_0 and Q4_K_M from ``edgeft export gguf``.

Speed: 2 threads, a 256-token prompt then 128 greedy tokens, median of 25 rounds (the order
rotating; decode and prefill goals are read from the per-round ratios to the builder); ONNX
folders run in onnxruntime-genai (the builder's and edgeft's alike), GGUF files in llama.cpp.
Accuracy: mean KL, top-1 agreement and perplexity against the checkpoint in PyTorch fp32 on the
shipped cooking text, every artifact fed the same token ids; and mean KL and top-1 on the
held-out cooking questions and answers (chat-formatted, about 4k tokens), a larger sample.
Writes ``results/onnx_export.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from gguf_export import machine
from onnx_builder_reference import DEFAULT_VENV, ensure_builder_venv, run_builder

from edgeft.bench.worker import timed_round

HERE = Path(__file__).resolve().parent

# Other int4 recipes measured beside the default one: row name → QuantSettings fields.
# (onnx_int4_recipes.py compares more of them, on the dev half of the held-out text.)
INT4_VARIANTS = {
    "edgeft int4, previous recipe (zero points, uniform blocks)": {
        "module_blocks": (),
        "symmetric": False,
    },
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
)


def folder_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.name.startswith("model.")]
    return sum(p.stat().st_size for p in files)


def with_our_tokenizer(builder_folder: Path, model: Path, work: Path) -> Path:
    """The builder's graph beside the checkpoint's tokenizer files: its tokenizer_config.json
    is written for transformers 5, which this environment does not have."""
    view = work / f"view-{builder_folder.name}"
    view.mkdir()
    for item in builder_folder.iterdir():
        if item.name.startswith("model.") or item.name == "genai_config.json":
            (view / item.name).symlink_to(item)
    for name in TOKENIZER_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, view / name)
    return view


def speeds(artifacts: dict, prompt_ids: list[int], new_tokens: int, repeats: int) -> dict:
    """Prefill and decode tok/s of every artifact in each of ``repeats`` rounds. Every round
    runs each artifact once, starting one further along the list each time, so that a busy
    spell on a shared machine hits them all alike and no artifact always goes first."""
    from edgeft.runtimes import get_runtime

    sessions = {}
    for name, (runtime, path) in artifacts.items():
        sessions[name] = get_runtime(runtime).load(path, threads=2)
    names = list(sessions)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    try:
        for round_ in range(repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                # timed as edgeft bench times it, each runtime decoding new_tokens steps
                runs[name].append(timed_round(sessions[name], prompt_ids, new_tokens))
    finally:
        for session in sessions.values():
            session.close()
    return runs


def round_ratios(runs: dict, name: str, reference: str, which: int = 1) -> list[float]:
    """``name``'s decode (``which`` 1) or prefill (0) speed over ``reference``'s, round by
    round."""
    return [a[which] / b[which] for a, b in zip(runs[name], runs[reference], strict=True)]


def speed_row(runs: dict, name: str, reference: str) -> dict:
    """``name``'s median prefill and decode tok/s, each round's, and the median (quartiles)
    of its per-round ratios to ``reference`` (``*_vs_builder_int4``)."""
    row = {}
    for which, what in ((0, "prefill"), (1, "decode")):
        ratios = round_ratios(runs, name, reference, which)
        row[f"{what}_tok_s"] = round(statistics.median(r[which] for r in runs[name]), 1)
        row[f"{what}_per_round"] = [round(r[which], 1) for r in runs[name]]
        row[f"{what}_vs_builder_int4"] = round(statistics.median(ratios), 3)
        row[f"{what}_vs_builder_int4_quartiles"] = [round(q, 3) for q in quartiles(ratios)]
    return row


HELDOUT_CHUNK = 512
HELDOUT_CHUNKS = 8


def heldout_chunks(model: Path) -> list[list[int]]:
    """Token ids of the held-out cooking questions, each with its first answer, in the
    checkpoint's chat format: up to 8 chunks of 512 tokens."""
    from transformers import AutoTokenizer

    from edgeft.demo import dataset_path
    from edgeft.evaluate import load_qa

    tokenizer = AutoTokenizer.from_pretrained(model)
    ids: list[int] = []
    for row in load_qa(dataset_path("dev.jsonl")):
        chat = [
            {"role": "user", "content": row.question},
            {"role": "assistant", "content": row.answers[0]},
        ]
        ids += tokenizer(
            tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False
        )["input_ids"]
    chunks = [ids[i : i + HELDOUT_CHUNK] for i in range(0, len(ids), HELDOUT_CHUNK)]
    return [c for c in chunks if len(c) > 1][:HELDOUT_CHUNKS]


def accuracy(artifact: Path, runtime: str, reference) -> dict:
    from edgeft.parity import compare_logits, perplexity
    from edgeft.runtimes import get_runtime

    session = get_runtime(runtime).load(artifact, threads=2)
    try:
        logits = session.logits(reference["ids"])
        heldout = [
            compare_logits(ref, session.logits(ids))
            for ids, ref in zip(reference["heldout_ids"], reference["heldout"], strict=True)
        ]
    finally:
        session.close()
    parity = compare_logits(reference["logits"], logits)
    # onnx_int4_recipes.py chooses recipes on the first half of the held-out chunks; the
    # second half is what no choice looked at.
    dev, test = heldout[: len(heldout) // 2], heldout[len(heldout) // 2 :]
    return {
        "mean_kl": parity.mean_kl,
        "top1": parity.top1_agreement,
        "perplexity": perplexity(logits, reference["ids"]),
        "heldout_mean_kl": weighted(heldout, "mean_kl"),
        "heldout_top1": weighted(heldout, "top1_agreement"),
        "heldout_dev_mean_kl": weighted(dev, "mean_kl"),
        "heldout_test_mean_kl": weighted(test, "mean_kl"),
    }


def weighted(parities: list, what: str) -> float:
    """A mean over chunks, each weighted by its positions."""
    return sum(getattr(p, what) * p.positions for p in parities) / sum(
        p.positions for p in parities
    )


def quartiles(values: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("edgeft-demo/merged"))
    parser.add_argument("--builder-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a checkpoint; run `make demo` first or pass --model")

    from edgeft.export.gguf import export_gguf
    from edgeft.export.onnx import QuantSettings, export_onnx
    from edgeft.fidelity import default_eval_text
    from edgeft.runtimes import get_runtime

    model = args.model.resolve()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="edgeft-onnx-bench-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        ours = export_onnx(model, work / "edgeft", ("fp32", "int8", "int4"))
        export_seconds = time.perf_counter() - start
        variants = {}
        for index, (name, fields) in enumerate(INT4_VARIANTS.items()):
            variants[name] = work / f"edgeft-variant-{index}"
            export_onnx(model, variants[name], ("int4",), settings=QuantSettings(**fields))
        builder_info = ensure_builder_venv(args.builder_venv)
        python = args.builder_venv / "bin" / "python"
        (work / "builder").mkdir()
        builds = {p: run_builder(python, model, work / "builder", p) for p in ("int4", "int8")}
        gguf = export_gguf(model, work / "gguf", ("q8_0", "q4_k_m"))

        builder = {
            f"genai builder {precision}": (
                "onnxruntime-genai",
                with_our_tokenizer(Path(build["folder"]), model, work),
            )
            for precision, build in builds.items()
        }
        # The int4 folders sit next to the builder's int4 in the timing order (which rotates
        # round by round, keeping neighbours), so each ratio compares runs seconds apart.
        artifacts = {
            f"edgeft {f.folder}": ("onnxruntime-genai", work / "edgeft" / f.folder)
            for f in ours.folders
        }
        artifacts["genai builder int4"] = builder.pop("genai builder int4")
        for name, folder in variants.items():
            artifacts[name] = ("onnxruntime-genai", folder / "int4")
        artifacts.update(builder)
        for f in gguf.files:
            artifacts[f"llama.cpp {f.type}"] = ("llama.cpp", work / "gguf" / f.file)

        torch_session = get_runtime("torch").load(model, threads=2)
        ids = torch_session.tokenize(default_eval_text())
        prompt = torch_session.tokenize(default_eval_text() * 3)[: args.prompt_tokens]
        heldout = heldout_chunks(model)
        reference = {
            "ids": ids,
            "logits": torch_session.logits(ids),
            "heldout_ids": heldout,
            "heldout": [torch_session.logits(chunk) for chunk in heldout],
        }
        torch_session.close()

        runs = speeds(artifacts, prompt, args.new_tokens, args.repeats)
        for name, (runtime, path) in artifacts.items():
            # Logits through onnxruntime for ONNX folders: genai returns the same numbers.
            logits_runtime = "onnxruntime" if runtime == "onnxruntime-genai" else runtime
            rows[name] = {
                "runtime": runtime,
                "bytes": folder_bytes(path),
                **speed_row(runs, name, "genai builder int4"),
                **accuracy(path, logits_runtime, reference),
            }
            print(name, rows[name], flush=True)

    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": f"python benchmarks/onnx_export.py --model {args.model}",
        "settings": {
            "threads": 2,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "eval_tokens": len(ids),
            "heldout_tokens": sum(len(c) for c in heldout),
            "edgeft": {"graph": "fused", "quantization": ours.settings.__dict__},
            "int4_variants": INT4_VARIANTS,
        },
        "edgeft_export_seconds": round(export_seconds, 1),
        "builder": {
            p: {k: b[k] for k in ("command", "wall_s", "peak_rss_mb", "folder_bytes")}
            for p, b in builds.items()
        },
        "builder_venv": builder_info.get("packages", {}),
        "reference_perplexity": ours.reference_perplexity,
        "artifacts": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_export.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results, args.out / "onnx_export.md")
    print((args.out / "onnx_export.md").read_text())


def write_markdown(results: dict, path: Path) -> None:
    m, s = results["machine"], results["settings"]
    lines = [
        "# ONNX export vs onnxruntime-genai's builder and llama.cpp",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {results['date']}. "
        f"Reproduce: `{results['command']}`.",
        "",
        f"Speed: {s['threads']} threads, {s['prompt_tokens']}-token prompt, then "
        f"{s['new_tokens']} greedy tokens, median of {s['repeats']} rounds; in each round every "
        "artifact runs once, the order rotating. The speed goal is read from the median of "
        "the per-round ratios to the builder (a busy spell on this shared machine slows a whole "
        "round, not one artifact); its quartiles show the spread. Accuracy: against the "
        f"checkpoint in PyTorch fp32 on a {s['eval_tokens']}-token cooking text (perplexity "
        f"{results['reference_perplexity']:.2f}), and on {s['heldout_tokens']} tokens of "
        "held-out cooking questions and answers.",
        "",
        "| artifact | runtime | size MB | prefill tok/s | decode tok/s | prefill vs builder "
        "int4 (quartiles) | decode vs builder int4 (quartiles) | mean KL | top-1 | perplexity "
        "| held-out KL | held-out top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r: dict, what: str) -> str:
        if f"{what}_vs_builder_int4" not in r:  # results written before prefill was paired
            return "–"
        q1, q3 = r[f"{what}_vs_builder_int4_quartiles"]
        return f"{r[f'{what}_vs_builder_int4']:.3f} ({q1:.2f}–{q3:.2f})"

    for name, r in results["artifacts"].items():
        lines.append(
            f"| {name} | {r['runtime']} | {r['bytes'] / 1e6:.1f} | {r['prefill_tok_s']:.0f} | "
            f"{r['decode_tok_s']:.0f} | {ratio(r, 'prefill')} | {ratio(r, 'decode')} | "
            f"{r['mean_kl']:.4f} | {r['top1']:.1%} | {r['perplexity']:.2f} | "
            f"{r['heldout_mean_kl']:.4f} | {r['heldout_top1']:.1%} |"
        )
    a = results["artifacts"]
    int4, builder, q4 = a["edgeft int4"], a["genai builder int4"], a["llama.cpp q4_k_m"]
    int8, q8 = a["edgeft int8"], a["llama.cpp q8_0"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines += [
        "",
        "Goals (issue: int4 ≤ 105 MB, decode and prefill ≥ 1.0× the builder's int4, KL on the "
        "held-out text ≤ llama.cpp Q4_K_M's; int8 KL ≤ llama.cpp Q8_0):",
        "",
        f"- int4 size {int4['bytes'] / 1e6:.1f} MB: {verdict(int4['bytes'] <= 105e6)}",
        f"- int4 decode {int4['decode_vs_builder_int4']:.3f}× the builder's (median of per-round "
        f"ratios; medians alone {int4['decode_tok_s'] / builder['decode_tok_s']:.3f}×): "
        f"{verdict(int4['decode_vs_builder_int4'] >= 1.0)}",
        *(
            [
                f"- int4 prefill {int4['prefill_vs_builder_int4']:.3f}× the builder's: "
                f"{verdict(int4['prefill_vs_builder_int4'] >= 1.0)}"
            ]
            if "prefill_vs_builder_int4" in int4
            else []
        ),
        f"- int4 held-out KL {int4['heldout_mean_kl']:.4f} vs Q4_K_M "
        f"{q4['heldout_mean_kl']:.4f} (short text: {int4['mean_kl']:.4f} vs "
        f"{q4['mean_kl']:.4f}): {verdict(int4['heldout_mean_kl'] <= q4['heldout_mean_kl'])}",
        *(
            [
                f"- int4 KL on the held-out text's second half, which no recipe was chosen on: "
                f"{int4['heldout_test_mean_kl']:.4f} vs Q4_K_M {q4['heldout_test_mean_kl']:.4f}: "
                f"{verdict(int4['heldout_test_mean_kl'] <= q4['heldout_test_mean_kl'])}"
            ]
            if "heldout_test_mean_kl" in int4
            else []
        ),
        f"- int8 KL {int8['mean_kl']:.4f} vs Q8_0 {q8['mean_kl']:.4f}: "
        f"{verdict(int8['mean_kl'] <= q8['mean_kl'])}",
        "",
        *(
            f"{name}: {a[name]['bytes'] / 1e6:.1f} MB, decode "
            f"{a[name]['decode_vs_builder_int4']:.3f}× and prefill "
            f"{a[name]['prefill_vs_builder_int4']:.3f}× the builder's, mean KL "
            f"{a[name]['mean_kl']:.4f}, held-out {a[name]['heldout_mean_kl']:.4f}."
            for name in results["settings"].get("int4_variants", {})
        ),
    ]
    b = results["builder"]
    lines += [
        "",
        f"Build time: `edgeft export onnx` (fp32 + int8 + int4, with its checks) "
        f"{results['edgeft_export_seconds']} s; the builder {b['int4']['wall_s']} s for int4, "
        f"{b['int8']['wall_s']} s for int8.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
