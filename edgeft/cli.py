"""The ``edgeft`` command. Only this module prints and chooses exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgeft import __version__
from edgeft.errors import EdgeftError
from edgeft.options import DEFAULT_THREADS, HelpFormatter, add_options, settings_from

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
# An artifact failed or missed a budget: edgeft bench as a CI gate.
EXIT_BUDGET = 3
# recommend times every candidate: an empty and a conversation-long context, not a long
# document's, keeps the screening run short
RECOMMEND_DEPTHS = (0, 512)


def _add_train(sub) -> None:
    from edgeft.train import TrainSettings

    p = sub.add_parser(
        "train",
        help="QLoRA/LoRA fine-tuning on a JSONL dataset",
        description="Fine-tune a causal LM on JSONL data (chat 'messages', "
        "'prompt'/'completion' or alpaca 'instruction'/'input'/'output' rows) "
        "and write a PEFT adapter directory.",
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model: local HF directory, hub id, or "
        "'smollm2-135m-instruct' (default, embedded)",
    )
    p.add_argument("--data", required=True, type=Path, help="training JSONL file")
    p.add_argument("--out", required=True, type=Path, help="output adapter directory")
    p.add_argument("--eval-data", type=Path, help="held-out JSONL (default: split from --data)")
    p.add_argument(
        "--preserve",
        type=Path,
        metavar="JSONL",
        help="rows of what the model should keep doing (general requests, prose), trained on "
        "their KL divergence from the base model so fine-tuning does not make it forget them",
    )
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="drop bad rows with a counted warning instead of failing",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint of an interrupted run",
    )
    _add_allow_pickle(p)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_options(p.add_argument_group("training settings (saved in edgeft.json)"), TrainSettings)
    p.set_defaults(handler=_run_train)


def _add_allow_pickle(p) -> None:
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a base that has only pickled weights (pytorch_model.bin) with "
        "torch.load(weights_only=True); off by default: edgeft does not unpickle",
    )


def _run_train(args) -> int:
    from edgeft.train import TrainSettings, is_main_process, train

    result = train(
        args.base,
        args.data,
        args.out,
        settings_from(args, TrainSettings),
        eval_data=args.eval_data,
        preserve=args.preserve,
        skip_bad_rows=args.skip_bad_rows,
        resume=args.resume,
        force=args.force,
        progress=not args.quiet,
        allow_pickle=args.allow_pickle,
    )
    if not is_main_process():  # under accelerate launch: rank 0 reports for all
        return 0
    report = result.data
    if report.skipped:
        print(
            f"warning: skipped {len(report.skipped)} bad rows, first: {report.skipped[0]}",
            file=sys.stderr,
        )
    if report.truncated:
        print(
            f"warning: {report.truncated} of {report.rows} rows were truncated at "
            f"--max-length {result.settings.max_length}",
            file=sys.stderr,
        )
    before = "" if result.eval_loss_before is None else f"{result.eval_loss_before:.4f} → "
    after = "-" if result.eval_loss is None else f"{result.eval_loss:.4f}"
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s: train loss "
        f"{result.train_loss:.4f}, eval loss {before}{after}; adapter written to {result.out}"
    )
    return 0


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="fold an adapter into full-precision weights",
        description="Merge a LoRA/QLoRA adapter into full-precision base weights "
        "(never into 4-bit weights), check parity against the as-trained model "
        "and save a plain Hugging Face checkpoint.",
    )
    p.add_argument("--adapter", required=True, type=Path, help="output directory of edgeft train")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.add_argument(
        "--merge-base",
        choices=["original", "dequantized"],
        default=None,
        help="QLoRA: 'dequantized' (default) reproduces the as-trained model; "
        "'original' adds the delta to the full-precision base",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="dtype of the saved weights",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the adapter's delta by this, in (0, 1]: 1 is the model as trained; "
        "less keeps more of the base model's general ability and less of what "
        "was learned (choose it on held-out data, e.g. with edgeft bench --task)",
    )
    p.add_argument(
        "--base",
        default=None,
        help="base model location if it moved (must hash to the recorded weights)",
    )
    _add_allow_pickle(p)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=_run_merge)


def _run_merge(args) -> int:
    from edgeft.merge import merge

    result = merge(
        args.adapter,
        args.out,
        merge_base=args.merge_base,
        dtype=args.dtype,
        scale=args.scale,
        base=args.base,
        force=args.force,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    verdict = "within tolerance" if result.gated else "reported (original base: not gated)"
    print(
        f"merged {result.modules} modules"
        + (f" at scale {result.scale:g}" if result.scale != 1 else "")
        + f" into the {result.merge_base} weights ({result.dtype}); "
        f"parity vs as-trained model: {result.parity.summary()} [{verdict}]; "
        f"checkpoint written to {result.out}"
    )
    return 0


def _add_export(sub, parser_class) -> None:
    from edgeft.export.gguf import GGUF_TYPES

    p = sub.add_parser(
        "export",
        help="convert a merged checkpoint for an edge runtime",
        description="Export a full-precision checkpoint to the files an edge runtime loads, "
        "and measure each file against the checkpoint.",
    )
    formats = p.add_subparsers(dest="format", metavar="FORMAT", parser_class=parser_class)
    formats.required = True

    g = formats.add_parser(
        "gguf",
        help="GGUF files for llama.cpp (F32/F16/BF16 and llama.cpp quantizations)",
        description="Convert a Hugging Face checkpoint (llama, mistral, qwen2) to GGUF, quantize "
        "it with llama.cpp's own quantizer, prove llama.cpp tokenizes like the Hugging Face "
        "tokenizer, and measure every file against the checkpoint.",
    )
    g.add_argument(
        "--model",
        required=True,
        type=Path,
        help="checkpoint directory (edgeft merge output), or a GGUF file to quantize",
    )
    g.add_argument(
        "--quant",
        default="f16,q8_0,q4_k_m",
        help=f"comma-separated types from: {', '.join(GGUF_TYPES)}",
    )
    g.add_argument("--out", required=True, type=Path, help="output directory")
    g.add_argument(
        "--eval-text", type=Path, help="UTF-8 text for the parity check (default: a cooking text)"
    )
    _add_threads(g)
    g.add_argument(
        "--allow-requantize",
        action="store_true",
        help="quantize a GGUF --model that is itself quantized (adds rounding error)",
    )
    g.add_argument(
        "--imatrix",
        metavar="auto|none|FILE",
        default=None,
        help="importance matrix for the quantized types: 'auto' computes it on --calibration, "
        "else the fine-tuning data in the checkpoint's provenance, else text sampled from the "
        "model, and writes it as imatrix.gguf; or a file from llama-imatrix (default: auto "
        "when there is calibration data, else none; iq4_xs, iq3_m, iq3_s and q2_k need one)",
    )
    g.add_argument(
        "--calibration",
        type=Path,
        help="text or JSONL the importance matrix is computed on (default: the fine-tuning "
        "data named in the checkpoint's provenance)",
    )
    g.add_argument("--force", action="store_true", help="replace an existing --out")
    g.set_defaults(handler=_run_export_gguf)

    lo = formats.add_parser(
        "gguf-lora",
        help="a LoRA adapter as a GGUF that llama.cpp applies over the base GGUF",
        description="Write an edgeft train adapter as a llama.cpp LoRA GGUF and check base + "
        "adapter in llama.cpp against the adapter in PyTorch.",
    )
    lo.add_argument("--adapter", required=True, type=Path, help="output directory of edgeft train")
    lo.add_argument("--out", required=True, type=Path, help="output directory")
    lo.add_argument(
        "--base-gguf",
        type=Path,
        help="the base GGUF apps ship (from edgeft export gguf); checked to be the adapter's base",
    )
    lo.add_argument("--base", help="base model location if it moved")
    lo.add_argument("--type", choices=["f16", "f32"], default="f16", help="tensor type")
    lo.add_argument("--eval-text", type=Path, help="UTF-8 text for the parity check")
    _add_threads(lo)
    lo.add_argument("--force", action="store_true", help="replace an existing --out")
    lo.set_defaults(handler=_run_export_gguf_lora)

    from edgeft.export.onnx.quantize import ONNX_TYPES, QuantSettings

    o = formats.add_parser(
        "onnx",
        help="ONNX folders with a KV cache for onnxruntime and onnxruntime-genai",
        description="Export a Hugging Face checkpoint (llama, mistral, qwen2) with optimum-onnx "
        "to one folder per precision (model.onnx, tokenizer, genai_config.json), check fp32 "
        "against PyTorch, and measure every folder in onnxruntime and onnxruntime-genai.",
    )
    o.add_argument(
        "--model",
        required=True,
        type=Path,
        help="checkpoint directory (with --adapter: the base the adapters were trained on)",
    )
    o.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an edgeft train adapter of --model's base, repeatable: the folders take LoRA "
        "inputs and each adapter is written as adapters/NAME.onnx_adapter, which onnxruntime "
        "and onnxruntime-genai apply and swap at run time (types fp32, int8, int4)",
    )
    o.add_argument(
        "--quant",
        default="fp32,int8,int4",
        help=f"comma-separated types from: {', '.join(ONNX_TYPES)}; int8/int4 are weight-only "
        "(MatMulNBits), int8-dynamic quantizes activations too",
    )
    o.add_argument("--out", required=True, type=Path, help="output directory")
    o.add_argument(
        "--calibration",
        type=Path,
        help="text or JSONL for GPTQ (default: the fine-tuning data named in the checkpoint's "
        "provenance, else text sampled from the model itself)",
    )
    o.add_argument(
        "--graph",
        choices=["fused", "optimum"],
        default="fused",
        help="fused: edgeft's graph with onnxruntime's fused attention and norms (fast); "
        "optimum: optimum-onnx's trace of the PyTorch model",
    )
    o.add_argument(
        "--ort-format",
        action="store_true",
        help="also write model.ort and required_operators.config for mobile builds",
    )
    o.add_argument("--eval-text", type=Path, help="UTF-8 text for the parity check")
    o.add_argument(
        "--max-length",
        type=int,
        help="onnxruntime-genai's context in genai_config.json (default: the model's, at most "
        "4096, llama.cpp's default context); genai allocates its whole KV cache up front, so a "
        "shorter one saves memory on phones",
    )
    _add_threads(o)
    o.add_argument("--force", action="store_true", help="replace an existing --out")
    add_options(o.add_argument_group("quantization of the int8 and int4 folders"), QuantSettings)
    o.set_defaults(handler=_run_export_onnx)


def _add_threads(p) -> None:
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="CPU threads")


def _read_eval_text(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeftError(f"{path}: cannot read the eval text as UTF-8: {exc}") from exc


def _progress(args):
    return None if args.quiet else (lambda message: print(f"  {message}", file=sys.stderr))


def _run_export_gguf(args) -> int:
    from edgeft.export.gguf import export_gguf

    result = export_gguf(
        args.model,
        args.out,
        args.quant,
        eval_text=_read_eval_text(args.eval_text),
        threads=args.threads,
        force=args.force,
        allow_requantize=args.allow_requantize,
        imatrix=args.imatrix,
        calibration=args.calibration,
        progress=_progress(args),
    )
    if result.imatrix:
        made = result.imatrix
        print(
            f"importance matrix: {made['file']} ({made['tokens']} tokens of {made['source']}, "
            f"{made['entries']} tensors)"
        )
    if result.tokenizer:
        print(
            f"llama.cpp token ids identical to the Hugging Face tokenizer on "
            f"{result.tokenizer['texts']} texts ({result.tokenizer['tokens']} tokens)"
        )
    print(
        f"parity on {result.eval_tokens} eval tokens against "
        f"{'the source GGUF' if not result.tokenizer else 'the checkpoint in PyTorch'}, "
        f"whose perplexity is {result.reference_perplexity:.3f}:"
    )
    print(
        f"  {'file':<22}{'size':>10}{'mean KL':>11}{'top-1':>9}{'perplexity':>12}"
        "  greedy (32 tokens)"
    )
    for f in result.files:
        greedy = (
            "identical"
            if f.greedy_first_divergence is None
            else (f"diverges at {f.greedy_first_divergence}")
        )
        print(
            f"  {f.file:<22}{f.bytes / 1e6:>8.1f}MB{f.parity.mean_kl:>11.2e}"
            f"{f.parity.top1_agreement:>9.1%}{f.perplexity:>12.3f}  {greedy}"
        )
        kinds = ", ".join(f"{n} {kind}" for kind, n in f.tensor_types.items())
        print(f"  {'':<22}tensors: {kinds}")
    for note in result.notes:
        print(f"note: {note}")
    print(f"written to {result.out}")
    return 0


def _run_export_onnx(args) -> int:
    from edgeft.export.onnx import QuantSettings, export_onnx
    from edgeft.export.onnx.lora import parse_adapters

    result = export_onnx(
        args.model,
        args.out,
        args.quant,
        settings=settings_from(args, QuantSettings),
        graph=args.graph,
        calibration=args.calibration,
        eval_text=_read_eval_text(args.eval_text),
        ort_format=args.ort_format,
        max_length=args.max_length,
        adapters=parse_adapters(args.adapter),
        threads=args.threads,
        force=args.force,
        progress=_progress(args),
    )
    print(
        f"parity on {result.eval_tokens} eval tokens against the checkpoint in PyTorch, whose "
        f"perplexity is {result.reference_perplexity:.3f}:"
    )
    print(
        f"  {'folder':<14}{'size':>10}{'mean KL':>11}{'top-1':>9}{'perplexity':>12}"
        "  greedy (32 tokens)   onnxruntime-genai"
    )
    for f in result.folders:
        greedy = (
            "identical"
            if f.greedy_first_divergence is None
            else (f"diverges at {f.greedy_first_divergence}")
        )
        genai = "same tokens" if f.genai_greedy_identical else "other tokens"
        print(
            f"  {f.folder:<14}{f.bytes / 1e6:>8.1f}MB{f.parity.mean_kl:>11.2e}"
            f"{f.parity.top1_agreement:>9.1%}{f.perplexity:>12.3f}  {greedy:<21}{genai}"
        )
    for adapter in result.adapters:
        print(
            f"{adapter.file} ({adapter.bytes / 1e6:.2f} MB, {adapter.modules} modules, rank "
            f"{adapter.rank}) against the adapter in PyTorch (perplexity "
            f"{adapter.reference_perplexity:.3f}):"
        )
        for f in adapter.folders:
            genai = "same tokens" if f.genai_greedy_identical else "other tokens"
            print(
                f"  {f.folder + ' + ' + adapter.name:<24}{f.parity.mean_kl:>11.2e}"
                f"{f.parity.top1_agreement:>9.1%}{f.perplexity:>12.3f}  genai: {genai}"
            )
    for note in result.notes:
        print(f"note: {note}")
    print(f"written to {result.out}")
    return 0


def _run_export_gguf_lora(args) -> int:
    from edgeft.export.gguf import export_gguf_lora

    result = export_gguf_lora(
        args.adapter,
        args.out,
        base_gguf=args.base_gguf,
        base=args.base,
        lora_type=args.type,
        eval_text=_read_eval_text(args.eval_text),
        threads=args.threads,
        force=args.force,
        progress=_progress(args),
    )
    verdict = "within tolerance" if result.gated else "reported (quantized base: not gated)"
    print(
        f"{result.modules} LoRA modules (alpha {result.alpha:g}) written to {result.file}; "
        f"base ({result.base_gguf}) + adapter in llama.cpp vs PyTorch: "
        f"{result.parity.summary()}, perplexity {result.perplexity:.3f} vs "
        f"{result.reference_perplexity:.3f} [{verdict}]"
    )
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the cooking-assistant case study on the embedded model",
        description="Fine-tune SmolLM2-135M-Instruct on the shipped cooking "
        "dataset with QLoRA and with LoRA, merge both, export the QLoRA model to GGUF (Q8_0, "
        "Q4_K_M) and ONNX (int8, int4), and benchmark the base, the base with worked examples "
        "in its prompt, both fine-tuned models and every export: held-out cooking questions, "
        "general questions and text (what fine-tuning cost), KL, size, speed, memory.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("edgeft-demo"),
        help="output directory",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=_run_demo)


def _run_demo(args) -> int:
    from edgeft.demo import BASE, TUNED, demo

    result = demo(args.out, force=args.force, progress=not args.quiet)
    print()
    print((args.out / "report.md").read_text(encoding="utf-8"))
    incontext = next(iter(result.incontext_labels.values()))
    print(
        "cooking test accuracy: "
        + ", ".join(
            f"{label} {_percent(result.accuracy(label))}" for label in (BASE, incontext, TUNED)
        )
        + f"; everything is under {result.out.resolve()}"
    )
    print(f"report: {(result.out / 'report.html').resolve()} (also report.md)")
    return 0


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _add_bench(sub) -> None:
    from edgeft.bench.harness import BenchSettings

    p = sub.add_parser(
        "bench",
        help="latency, memory and accuracy of GGUF, ONNX and PyTorch artifacts",
        description="Measure every artifact in its own process: load time, time to first "
        "token, prefill and decode tok/s at several context depths, per-token percentiles, "
        "peak RSS, size; perplexity, KL and top-1 agreement against the reference, task "
        "accuracy. Writes results.json, report.md and report.html. Exit code 3 when an "
        "artifact fails or misses a budget.",
    )
    p.add_argument(
        "artifacts",
        nargs="*",
        help="a .gguf file, an ONNX folder, a checkpoint or adapter folder; PATH@RUNTIME "
        "picks the runtime (torch, llama.cpp, onnxruntime, onnxruntime-genai)",
    )
    p.add_argument("--out", type=Path, help="output directory (required unless comparing)")
    p.add_argument(
        "--reference",
        action="append",
        type=Path,
        help="full-precision checkpoint to compare against (repeatable; default: the one the "
        "artifacts were exported from, per their edgeft.json)",
    )
    p.add_argument(
        "--as-trained",
        action="store_true",
        help="also compare against the adapter the reference was merged from, as trained",
    )
    p.add_argument(
        "--adapter",
        action="append",
        type=Path,
        default=[],
        help="a LoRA adapter file (.onnx_adapter from 'edgeft export onnx --adapter', or a LoRA "
        ".gguf from 'edgeft export gguf-lora'), repeatable: every artifact it applies to is "
        "also measured with it applied, as its own row",
    )
    p.add_argument("--eval", type=Path, help="text or JSONL for perplexity and KL")
    p.add_argument(
        "--task",
        action="append",
        type=Path,
        help="held-out JSONL of question/answers rows (repeatable: budgets read the first; "
        "each is reported under its file name)",
    )
    p.add_argument(
        "--text",
        action="append",
        type=Path,
        help="a further text or JSONL for perplexity alone, reported under its file name "
        "(repeatable), e.g. general-domain text beside --eval's",
    )
    p.add_argument("--device", help="device profile name or .toml (see 'edgeft devices list')")
    p.add_argument("--remote", help="run on a device: adb:SERIAL or ssh:user@host[:port]")
    p.add_argument("--runtime", help="runtime for every artifact without an @RUNTIME")
    add_options(p.add_argument_group("timing and scoring"), BenchSettings)
    _add_budget_options(p)
    p.add_argument(
        "--compare",
        type=Path,
        help="an earlier results.json: show the change (with no artifacts: compare it with "
        "the results.json given as the only argument)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=_run_bench)


def _by_stem(paths: list[Path]) -> dict[str, Path]:
    """Files by their name without the suffix (the parent folder's name added where two
    share one)."""
    out: dict[str, Path] = {}
    for path in paths:
        out[path.stem if path.stem not in out else f"{path.parent.name}/{path.stem}"] = path
    return out


def _run_bench(args) -> int:
    from edgeft.bench.harness import BenchSettings, bench
    from edgeft.bench.report import render_comparison
    from edgeft.bench.schema import read_results

    if args.compare and len(args.artifacts) == 1 and args.artifacts[0].endswith(".json"):
        print(render_comparison(read_results(args.compare), read_results(Path(args.artifacts[0]))))
        return 0
    if args.out is None:
        raise EdgeftError("--out is required to run a benchmark")
    settings = settings_from(args, BenchSettings)
    budgets = _budgets_from(args)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    results = bench(
        args.artifacts,
        args.out,
        references=args.reference,
        as_trained=args.as_trained,
        eval_path=args.eval,
        task_path=args.task[0] if args.task else None,
        extra_tasks=_by_stem(args.task[1:] if args.task else []),
        extra_texts=_by_stem(args.text or []),
        device=args.device,
        remote=args.remote,
        runtime=args.runtime,
        settings=settings,
        budgets=budgets,
        compare=args.compare,
        adapters=args.adapter,
        force=args.force,
        log=log,
    )
    print((args.out / "report.md").read_text(encoding="utf-8"))
    if args.compare:
        print((args.out / "comparison.md").read_text(encoding="utf-8"))
    failed = [a["name"] for a in results["artifacts"] if a["status"] != "ok"]
    missed = [a["name"] for a in results["artifacts"] if a["status"] == "ok" and not a["passed"]]
    print(f"report: {(args.out / 'report.html').resolve()}")
    if failed or missed:
        parts = [f"failed: {', '.join(failed)}"] if failed else []
        parts += [f"missed a budget: {', '.join(missed)}"] if missed else []
        print(f"edgeft bench: {'; '.join(parts)}", file=sys.stderr)
        return EXIT_BUDGET
    return 0


def _add_devices(sub, parser_class) -> None:
    p = sub.add_parser("devices", help="edge device profiles for 'edgeft bench --device'")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    actions.required = True
    actions.add_parser("list", help="the shipped profiles").set_defaults(handler=_run_devices)
    show = actions.add_parser("show", help="one profile in full")
    show.add_argument("name", help="profile name or .toml file")
    show.set_defaults(handler=_run_devices)


def _run_devices(args) -> int:
    from edgeft.devices import get_profile, render_list, render_profile

    print(render_list() if args.action == "list" else render_profile(get_profile(args.name)))
    return 0


def _add_recommend(sub) -> None:
    from edgeft.bench.harness import BenchSettings
    from edgeft.recommend import DEFAULT_CANDIDATES

    p = sub.add_parser(
        "recommend",
        help="export the candidate files, bench them on a device profile, pick one",
        description="Export GGUF types (with and without an importance matrix) and ONNX int8 "
        "and int4 from a merged checkpoint, screen out those that cannot meet the budgets, "
        "bench the rest with the device profile, print the Pareto front (size, decode speed, "
        "accuracy) and the most accurate file that meets every budget, and say why each other "
        "one lost. Writes a bench results folder plus recommendation.json, which 'edgeft "
        "package' takes as its artifact. Exit code 3 when no candidate meets the budgets.",
    )
    p.add_argument("--model", required=True, type=Path, help="the merged checkpoint to ship")
    p.add_argument("--device", help="a device profile name or .toml (its budgets apply)")
    p.add_argument("--out", required=True, type=Path, help="results folder")
    p.add_argument(
        "--task",
        type=Path,
        help="held-out JSONL of question/answers rows: the pick is then the best task "
        "accuracy (else the lowest mean KL against the checkpoint); a dev split",
    )
    p.add_argument(
        "--report-task",
        action="append",
        type=Path,
        default=[],
        help="further question sets, scored and reported but not chosen on (a test split; "
        "repeatable)",
    )
    p.add_argument(
        "--accuracy-margin",
        type=float,
        default=0.0,
        help="with --task: pick the smallest file whose task accuracy is within this of the "
        "best, e.g. 0.03 for three points (0: the best; the smaller file on a tie)",
    )
    p.add_argument(
        "--candidates",
        default=DEFAULT_CANDIDATES,
        help="FORMAT:TYPE[:none] list; ':none' is a GGUF without importance matrix",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        help="text or JSONL for the importance matrix and GPTQ (default: the fine-tuning data "
        "the checkpoint's provenance names)",
    )
    p.add_argument(
        "--exports",
        type=Path,
        help="where candidate files are written and reused by later runs (default: OUT-exports)",
    )
    add_options(
        p.add_argument_group("timing"),
        BenchSettings,
        only=("threads", "depths", "repeats"),
        defaults={"depths": RECOMMEND_DEPTHS},
    )
    _add_budget_options(p)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=_run_recommend)


def _add_budget_options(p) -> None:
    budgets = p.add_argument_group("budgets (override the device profile's)")
    budgets.add_argument("--max-size-mb", type=float, help="file size, 10^6 bytes")
    budgets.add_argument("--max-rss-mb", type=float)
    budgets.add_argument("--min-decode-tok-s", type=float)
    budgets.add_argument("--max-ttft-ms", type=float)
    budgets.add_argument("--max-mean-kl", type=float)
    budgets.add_argument("--min-task-accuracy", type=float, help="0-1")


def _budgets_from(args):
    from edgeft.bench.harness import Budgets

    return Budgets(
        max_size_mb=args.max_size_mb,
        max_rss_mb=args.max_rss_mb,
        min_decode_tok_s=args.min_decode_tok_s,
        max_ttft_ms=args.max_ttft_ms,
        max_mean_kl=args.max_mean_kl,
        min_task_accuracy=args.min_task_accuracy,
    )


def _run_recommend(args) -> int:
    from edgeft.bench.harness import BenchSettings
    from edgeft.recommend import recommend

    settings = settings_from(args, BenchSettings)
    result = recommend(
        args.model,
        args.out,
        device=args.device,
        budgets=_budgets_from(args),
        task=args.task,
        report_tasks=_by_stem(args.report_task),
        accuracy_margin=args.accuracy_margin,
        candidates=args.candidates,
        calibration=args.calibration,
        exports=args.exports,
        settings=settings,
        force=args.force,
        log=lambda message: print(message, file=sys.stderr),
    )
    accuracy = "task" if result.objective == "task accuracy" else "mean KL"
    print(f"  {'candidate':<26}{'size':>9}{'decode':>12}{'TTFT':>9}{accuracy:>10}  front  verdict")
    for option in result.options:
        f = option.figures(result.reference, result.device)
        size = f"{f['size_mb']:.1f}MB" if f["size_mb"] else "-"
        speed = f"{f['decode_tok_s']:.1f}tok/s" if f["decode_tok_s"] else "-"
        ttft = f"{f['ttft_ms']:.0f}ms" if f["ttft_ms"] else "-"
        if result.objective == "task accuracy":
            acc = _percent(f["task_accuracy"])
        else:
            acc = "-" if f["mean_kl"] is None else f"{f['mean_kl']:.3g}"
        front = "  *  " if option.on_front else "     "
        print(
            f"  {option.candidate.name:<26}{size:>9}{speed:>12}{ttft:>9}{acc:>10}  {front}  "
            f"{option.verdict}"
        )
    print("(* on the Pareto front of size, decode speed and accuracy)")
    if result.pick is None:
        print(f"no candidate meets the budgets; see {result.out / 'report.md'}")
        return EXIT_BUDGET
    print(
        f"pick: {result.pick.candidate.name} ({result.pick.path}); package it with: edgeft "
        f"package {result.out} --target android --out bundle/"
    )
    return 0


def _add_package(sub) -> None:
    from edgeft.package import TARGETS

    p = sub.add_parser(
        "package",
        help="a bundle with a verified manifest for an Android/iOS/Linux app",
        description="Bundle a GGUF file or an ONNX folder with its tokenizer, chat template, "
        "generation defaults and manifest.json (every file's size and sha256, runtime and "
        "minimum version, quantization recipe, provenance, bench figures, and a golden greedy "
        "output for 'edgeft verify' and the app's own tests).",
    )
    p.add_argument(
        "artifact", help="a .gguf file, an ONNX folder, or an edgeft recommend folder (its pick)"
    )
    p.add_argument("--target", required=True, choices=TARGETS)
    p.add_argument("--out", required=True, type=Path, help="bundle folder (or .zip with --zip)")
    p.add_argument("--zip", action="store_true", help="write one .zip instead of a folder")
    p.add_argument(
        "--lora",
        action="append",
        type=Path,
        help="a LoRA adapter to ship beside the model, repeatable: a LoRA GGUF (edgeft export "
        "gguf-lora) for a GGUF, an .onnx_adapter (edgeft export onnx --adapter) for an ONNX "
        "folder; each gets its own golden output",
    )
    p.add_argument(
        "--bench", type=Path, help="a results.json of 'edgeft bench' holding this artifact's row"
    )
    _add_threads(p)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=_run_package)


def _run_package(args) -> int:
    from edgeft.package import package

    path = package(
        args.artifact,
        args.out,
        args.target,
        lora=args.lora,
        bench_results=args.bench,
        make_zip=args.zip,
        threads=args.threads,
        force=args.force,
    )
    print(f"bundle written to {path.resolve()}; check it with: edgeft verify {path}")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a bundle's files and golden output",
        description="Check a bundle (folder or .zip): manifest schema, every file's size and "
        "sha256, no unlisted files, then load the model in its runtime and compare a greedy "
        "generation with the golden output. Non-zero exit on any mismatch.",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--no-load", action="store_true", help="check files only")
    _add_threads(p)
    p.set_defaults(handler=_run_verify)


def _run_verify(args) -> int:
    from edgeft.package import verify

    report = verify(args.bundle, threads=args.threads, load=not args.no_load)
    golden = "" if args.no_load else f", golden output reproduced ({report.golden_tokens} tokens)"
    if report.adapters:
        golden += f"; {report.adapters} LoRA adapter(s) checked against the model"
    print(f"{args.bundle}: {report.files} files match the manifest{golden}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="metadata, tensors, quant types and tokenizer of a GGUF, ONNX or safetensors file",
    )
    p.add_argument("file", type=Path, help=".gguf, .onnx (or its folder), .safetensors")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args) -> int:
    import json

    from edgeft.inspect import inspect_file, render_inspection

    info = inspect_file(args.file)
    print(json.dumps(info, indent=2, default=str) if args.json else render_inspection(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeft",
        formatter_class=HelpFormatter,
        description="Fine-tune small language models with QLoRA, merge them correctly, and ship "
        "them to edge runtimes.",
    )
    parser.add_argument("--version", action="version", version=f"edgeft {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show library logs and full tracebacks"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    # The same flags after the subcommand (`edgeft train ... --verbose`); SUPPRESS keeps a flag
    # given before the subcommand from being reset by the subparser's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show library logs and full tracebacks",
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
    )

    def parser_class(**kw):
        return argparse.ArgumentParser(parents=[common], formatter_class=HelpFormatter, **kw)

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=parser_class)
    sub.required = True
    _add_train(sub)
    _add_merge(sub)
    _add_export(sub, parser_class)
    _add_bench(sub)
    _add_recommend(sub)
    _add_devices(sub, parser_class)
    _add_package(sub)
    _add_verify(sub)
    _add_inspect(sub)
    _add_demo(sub)
    return parser


def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        return args.handler(args)
    except EdgeftError as exc:
        if args.verbose:
            raise
        print(f"edgeft {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"edgeft {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as exc:
        if args.verbose:
            raise
        print(f"edgeft {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    except Exception as exc:  # a bug: one line by default, the traceback with --verbose
        if args.verbose:
            raise
        print(
            f"edgeft {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(re-run with --verbose for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
