"""The results tables of README.md and benchmarks/README.md, rendered from the committed results
under benchmarks/results/.

Each table sits in a marked section, ``<!-- NAME:start -->`` ... ``<!-- NAME:end -->``, whose
contents are rendered from the results file(s) it names (``SECTIONS``); a figure quoted in the
prose around them is checked against its results file (``FIGURES``). The docs are never edited
by hand inside a section: a new run rewrites its results file, then this script the sections.

Usage:
    python benchmarks/readme_tables.py          # rewrite every section from the results
    python benchmarks/readme_tables.py --check  # exit 1 naming each section or figure that differs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from case_study_settings import chosen, merged_at_scale, retention

from edgeft.demo import (
    BASE,
    BASE_Q8,
    TUNED,
    TUNED_LORA,
    DemoResult,
    Run,
    comparison_table,
    kept_answers,
)
from edgeft.demo import retention as demo_retention

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "README.md"
BENCH_README = HERE / "README.md"
WIDTH = 100  # the docs' line length


@cache
def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _link(doc: Path, name: str) -> str:
    """A markdown link from ``doc`` to ``benchmarks/results/NAME``."""
    folder = Path(os.path.relpath(RESULTS, doc.parent)).as_posix()
    return f"[{name}]({folder}/{name})"


def _kl(value: float, small: str = ".4f", large: str = ".3f", at: float = 0.01) -> str:
    """A mean KL at the precision that tells small ones apart: ``small`` below ``at``."""
    return format(value, small if value < at else large)


def _ratio(value: float, quartiles: list[float] | None = None) -> str:
    """A speed ratio to the reference; the reference itself reads 1."""
    if value == 1.0 and (quartiles is None or quartiles == [1.0, 1.0]):
        return "1"
    if quartiles is None:
        return f"{value:.2f}×"
    return f"{value:.3f}× ({quartiles[0]:.2f}–{quartiles[1]:.2f})"


# ---------------------------------------------------------------------------------------------
# README.md


def demo_result() -> DemoResult:
    """The committed demo run (demo.json and the two benchmarks it ran) as ``edgeft demo``'s own
    result, so that its table is rendered by the demo's own code. The benchmarks are read as
    committed, not validated against today's schema: a later schema must not change what a
    past run measured."""
    record = _json("demo.json")
    return DemoResult(
        out=RESULTS,
        runs={method: Run(**run) for method, run in record["runs"].items()},
        bench=_json("demo-bench.json"),
        incontext=_json("demo-bench-incontext.json"),
        labels=record["labels"],
        incontext_labels=record["incontext_labels"],
        machine=record["machine"],
        shots=record["shots"],
        seconds=record["seconds"],
    )


def demo_section(doc: Path) -> list[str]:
    result = demo_result()
    wall = _json("demo.json")["wall_seconds"]
    base, tuned = result.row(BASE), result.row(TUNED)
    incontext = next(iter(result.incontext_labels.values()))
    long, short = (result.row(x)["accuracy"]["task"]["prompt_tokens"] for x in (incontext, TUNED))
    kept = demo_retention(base, tuned)
    floor = demo_retention(base, result.row(BASE_Q8))
    cooking = base["accuracy"]["task"]
    return [
        f"`edgeft demo` on {result.machine} (whole run: {wall / 60:.1f} min), from "
        f"{_link(doc, 'demo.json')} and its benchmarks {_link(doc, 'demo-bench.json')} and "
        f"{_link(doc, 'demo-bench-incontext.json')} (the report: {_link(doc, 'demo.md')}; every "
        f"figure of each model: {_link(doc, 'demo-bench.md')}):",
        "",
        *comparison_table(result),
        "",
        f"Fine-tuning took cooking test accuracy from {result.accuracy(BASE):.1%} (base) to "
        f"{result.accuracy(TUNED):.1%} ({cooking['total']} questions worded differently "
        "from the training data, never used for a choice); the base model with "
        f"{result.shots} worked examples in its prompt reached "
        + " and ".join(
            f"{result.accuracy(label):.1%} ({result.row(label)['runtime']})"
            for label in result.incontext_labels.values()
        )
        + f", with a {long}-token median prompt against the fine-tuned model's {short}. "
        "Fine-tuning kept "
        + (f"{kept[0]} of the {kept[1]}" if kept else "-")
        + " general questions the base model answers"
        + (
            f" (the base model's own Q8_0 file keeps {floor[0]}: greedy answers flip on "
            "small numeric changes)"
            if floor
            else ""
        )
        + ". Mean KL is against the QLoRA "
        "fine-tuned model in PyTorch fp32 on a cooking text; TTFT on the median cooking "
        "prompt; decode speed from an empty context, 2 threads.",
    ]


# (label in gguf_export.json, row in the README)
GGUF_README_ROWS = (("q8_0", "Q8_0"), ("q4_k_m", "Q4_K_M"), ("q4_0", "Q4_0"))
GGUF_SIDES = ("edgeft", "llama.cpp")


def gguf_readme_section(doc: Path) -> list[str]:
    data = _json("gguf_export.json")
    conversion = list(data["conversion"].values())
    files, quality = data["quality"]["files"], data["quality"]
    lines = [
        f"GGUF export of the default model, from {_link(doc, 'gguf_export.json')} "
        f"({_link(doc, 'gguf_export.md')}; same machine, llama.cpp's own "
        "`convert_hf_to_gguf.py` measured in the same run):",
        "",
        "| | edgeft | llama.cpp's tools |",
        "|---|---|---|",
        "| HF fp32 → F16 GGUF: wall time | "
        + " | ".join(f"{c['wall_s_median']:.1f} s" for c in conversion)
        + " |",
        "| HF fp32 → F16 GGUF: peak RSS | "
        + " | ".join(f"{c['peak_rss_mb_median']} MB" for c in conversion)
        + " |",
    ]
    for i, (quant, label) in enumerate(GGUF_README_ROWS):
        cells = [files[f"{side} {quant}"] for side in GGUF_SIDES]
        size = f"{label} ({cells[0]['bytes'] / 1e6:.0f} MB)"
        head = f"{size}: mean KL / top-1 / perplexity" if i == 0 else size
        lines.append(
            f"| {head} | "
            + " | ".join(
                f"{_kl(c['mean_kl'], at=0.1)} / {c['top1']:.1%} / {c['perplexity']:.2f}"
                for c in cells
            )
            + " |"
        )
    lines += [
        "",
        f"Against the checkpoint in PyTorch fp32 on a {quality['eval_tokens']}-token cooking text "
        f"(perplexity {quality['reference_perplexity']:.2f}); edgeft quantizes from F32, "
        "llama.cpp's usual road from F16.",
    ]
    if quality.get("f16_tensors_identical_to_reference"):
        lines += ["", "The F16 tensors are byte-identical to llama.cpp's converter's."]
    return lines


# (artifact in onnx_export.json, row in README.md)
ONNX_README_ROWS = (
    ("edgeft int4", "edgeft int4"),
    ("genai builder int4", "onnxruntime-genai's builder int4"),
    ("llama.cpp q4_k_m", "llama.cpp Q4_K_M"),
    ("edgeft int8", "edgeft int8"),
    ("llama.cpp q8_0", "llama.cpp Q8_0"),
)


def onnx_readme_section(doc: Path) -> list[str]:
    data = _json("onnx_export.json")
    s = data["settings"]
    lines = [
        f"ONNX export of the demo's fine-tuned checkpoint, from {_link(doc, 'onnx_export.json')} "
        f"({_link(doc, 'onnx_export.md')}; same machine, {s['threads']} threads, "
        f"{s['prompt_tokens']}-token prompt then {s['new_tokens']} tokens; everything measured "
        f"in one run, speed as the median of {s['repeats']} paired rounds against the builder's "
        "int4; KL against the checkpoint in PyTorch fp32 on "
        f"{s['heldout_tokens']} tokens of held-out cooking chat):",
        "",
        "| artifact | size | prefill vs builder int4 | decode tok/s | decode vs builder int4 "
        "| held-out KL |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in ONNX_README_ROWS:
        a = data["artifacts"][name]
        lines.append(
            f"| {label} | {a['bytes'] / 1e6:.1f} MB | {_ratio(a['prefill_vs_builder_int4'])} | "
            f"{a['decode_tok_s']:.0f} | {_ratio(a['decode_vs_builder_int4'])} | "
            f"{_kl(a['heldout_mean_kl'])} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# benchmarks/README.md

# setting in case_study_settings.json → its row in benchmarks/README.md (a setting not named
# here shows under its own name)
SETTING_LABELS = {
    "previous: 3 epochs, lr 2e-3, no extra, no replay": (
        "previous demo: 427 rows, 3 epochs, lr 2e-3, no replay"
    ),
    "extra, replay 15, 2 epochs, lr 2e-3": (
        "+ 310 paraphrases, 15 replay rows per 100, 2 epochs, lr 2e-3"
    ),
    "extra, replay 15, 1 epoch, lr 2e-3": "same, 1 epoch",
    "extra, replay 15, 2 epochs, lr 1e-3": "same, 2 epochs at lr 1e-3",
    "extra, 111 replay rows as KL to base (weight 4), 2 epochs, lr 2e-3": (
        "+ 310 paraphrases, the 111 replay rows as preserve rows (KL to base, weight 4)"
    ),
    "extra, 111 replay rows as KL to base (weight 1), 2 epochs, lr 2e-3": "same, weight 1",
    "extra, 248 replay rows as KL to base (weight 1), 2 epochs, lr 2e-3": (
        "same, weight 1, 248 replay rows (137 short general questions added)"
    ),
    "extra, 224 replay rows as KL to base (weight 1), 2 epochs, lr 2e-3, LoRA on attention only": (
        "same, 224 replay rows, LoRA on attention only (q, k, v, o)"
    ),
}
METHOD_LABELS = {"qlora": "QLoRA", "lora": "LoRA"}


def _kept(base: dict, row: dict) -> tuple[int, int]:
    return kept_answers(base["general_correct"], row["general_correct"])


def case_study_section(doc: Path) -> list[str]:
    data = _json("case_study_settings.json")
    base, settings = data["base"], data["settings"]
    pick, _ = chosen(data)
    lines = [
        f"From {_link(doc, 'case_study_settings.json')}, {data['machine']}:",
        "",
        "| setting | cooking dev | general kept | general ppl (× base "
        f"{base['general_ppl']:.1f}) | train steps |",
        "|---|---:|---:|---:|---:|",
        f"| base | {base['cooking']:.1%} | - | {base['general_ppl']:.1f} (1.00×) | - |",
    ]
    for name, row in settings.items():
        if merged_at_scale(name):
            continue
        label = SETTING_LABELS.get(name, name) + (" (**chosen**)" if name == pick else "")
        kept, answered = _kept(base, row)
        lines.append(
            f"| {label} | {row['cooking']:.1%} | {kept}/{answered} | {row['general_ppl']:.1f} "
            f"({row['general_ppl'] / base['general_ppl']:.2f}×) | {row['steps']} |"
        )
    if data.get("base_q8_0"):
        kept, answered = _kept(base, data["base_q8_0"])
        lines.append(
            "| the base model's own Q8_0 GGUF in llama.cpp (no training: the measure's floor) "
            f"| - | {kept}/{answered} | - | - |"
        )
    scaled: dict[str, list[dict]] = {}
    for name, row in settings.items():
        if merged_at_scale(name):
            scaled.setdefault(row["settings"]["method"], []).append(row)
    if not scaled:
        return lines
    preserve = {row["preserve_rows"] for rows in scaled.values() for row in rows}
    lines += [
        "",
        f"The demo's own adapters ({'/'.join(map(str, sorted(preserve)))} preserve rows), merged "
        "at a scale below 1 with `edgeft merge --scale S` (`W + S·ΔW`: weight-space "
        "interpolation toward the base, at no training cost):",
        "",
        "| merge | cooking dev | general kept | general ppl (× base) |",
        "|---|---:|---:|---:|",
    ]
    for method, rows in scaled.items():
        kept = [_kept(base, row) for row in rows]
        lines.append(
            f"| {METHOD_LABELS.get(method, method)} at "
            + " / ".join(f"{row['scale']:g}" for row in rows)
            + " | "
            + " / ".join(f"{row['cooking']:.1%}" for row in rows)
            + " | "
            + " / ".join(str(k) for k, _ in kept)
            + f" of {kept[0][1]} | "
            + " / ".join(f"{row['general_ppl'] / base['general_ppl']:.2f}×" for row in rows)
            + " |"
        )
    return lines


def gguf_bench_section(doc: Path) -> list[str]:
    data = _json("gguf_export.json")
    (ours, ours_c), (theirs, theirs_c) = data["conversion"].items()
    same = data["quality"].get("f16_tensors_identical_to_reference")
    return [
        f"From {_link(doc, 'gguf_export.json')} ({data['machine']['cpu']}, "
        f"{data['machine']['cores']} cores, {data['date']}):",
        "",
        f"| | {ours} | {theirs} |",
        "|---|---|---|",
        f"| wall time | {ours_c['wall_s_median']:.2f} s | {theirs_c['wall_s_median']:.2f} s |",
        f"| peak RSS | {ours_c['peak_rss_mb_median']} MB | {theirs_c['peak_rss_mb_median']} MB |",
        f"| F16 tensor data | {'byte-identical' if same else 'differs'} | |",
    ]


# (artifact in onnx_export.json, row in benchmarks/README.md)
ONNX_BENCH_ROWS = (
    ("edgeft int4", "edgeft int4 (GPTQ, then norm tuning; the recipe below)"),
    (
        "edgeft int4, previous recipe (zero points, uniform blocks)",
        "edgeft int4, previous recipe (zero points, uniform blocks)",
    ),
    ("genai builder int4", "onnxruntime-genai builder int4"),
    ("llama.cpp q4_k_m", "llama.cpp Q4_K_M"),
    ("edgeft int8", "edgeft int8 (fp32 KV cache)"),
    ("genai builder int8", "onnxruntime-genai builder int8"),
    ("llama.cpp q8_0", "llama.cpp Q8_0"),
)


def onnx_bench_section(doc: Path) -> list[str]:
    data = _json("onnx_export.json")
    lines = [
        f"From {_link(doc, 'onnx_export.json')} ({data['machine']['cpu']}, "
        f"{data['settings']['threads']} threads, {data['date']}):",
        "",
        "| artifact | size | prefill vs builder int4 | decode tok/s | decode vs builder int4 "
        "| mean KL | top-1 | held-out KL (second half) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in ONNX_BENCH_ROWS:
        a = data["artifacts"][name]
        lines.append(
            f"| {label} | {a['bytes'] / 1e6:.1f} MB | "
            f"{_ratio(a['prefill_vs_builder_int4'], a['prefill_vs_builder_int4_quartiles'])} | "
            f"{a['decode_tok_s']:.0f} | "
            f"{_ratio(a['decode_vs_builder_int4'], a['decode_vs_builder_int4_quartiles'])} | "
            f"{_kl(a['mean_kl'])} | {a['top1']:.1%} | {_kl(a['heldout_mean_kl'])} "
            f"({_kl(a['heldout_test_mean_kl'])}) |"
        )
    return lines


# recipe in onnx_int4_recipes.json → its row (the builder, the reference, has none)
RECIPE_LABELS = {
    "default": "previous default (zero points, 4-bit blocks of 32, 8-bit of 64)",
    "gate/up 64, down 128, symmetric": "**gate/up 64, down 128, symmetric (the default now)**",
    "default, fp32 KV cache": "previous default, `--kv-cache fp32`",
    "q/k/v 8-bit, gate/up 64": "q/k/v at 8 bits, down at 4, gate/up 64",
    "q/k/v 8-bit, gate/up 64, symmetric": "the same, symmetric",
    "all 4-bit, symmetric": "all at 4 bits, symmetric",
    "llama.cpp q4_k_m": "llama.cpp Q4_K_M",
}
RECIPE_REFERENCE = "genai builder int4"


def int4_recipes_section(doc: Path) -> list[str]:
    data = _json("onnx_int4_recipes.json")
    lines = [
        f"From {_link(doc, 'onnx_int4_recipes.json')} ({data['machine']['cpu']}, "
        f"{data['settings']['threads']} threads, {data['settings']['repeats']} rounds, "
        f"{data['date']}):",
        "",
        "| recipe | size | prefill vs builder | decode vs builder | dev KL |",
        "|---|---|---|---|---|",
    ]
    for name, a in data["artifacts"].items():
        if name == RECIPE_REFERENCE:
            continue
        lines.append(
            f"| {RECIPE_LABELS.get(name, name)} | {a['bytes'] / 1e6:.1f} MB | "
            f"{_ratio(a['prefill_vs_builder_int4'], a['prefill_vs_builder_int4_quartiles'])} | "
            f"{_ratio(a['decode_vs_builder_int4'], a['decode_vs_builder_int4_quartiles'])} | "
            f"{a['dev_mean_kl']:.3f} |"
        )
    return lines


PHONE_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct", "llama-3.2-1b": "Llama-3.2-1B shape"}
PHONE_ARTIFACTS = {"model-q4_k_m.gguf": "llama.cpp Q4_K_M", "int4": "ONNX int4, int8 KV cache"}


def _speed(value: float) -> str:
    return f"{value:.0f}" if value >= 50 else f"{value:.1f}"


def phone_memory_section(doc: Path) -> list[str]:
    data = _json("phone_memory.json")
    lines = [
        f"From {_link(doc, 'phone_memory.json')} ({data['machine']}):",
        "",
        "| model | artifact | size | peak RSS | vs Q4_K_M | prefill tok/s "
        "| decode tok/s, depth 0 / 2048 |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in data["rows"]:
        gguf = next(a for a in row["artifacts"] if a["runtime"] == "llama.cpp")
        for a in row["artifacts"]:
            vs = a["peak_rss_mb"] / gguf["peak_rss_mb"]
            decode = " / ".join(_speed(a["decode_tok_s"][d]) for d in ("0", "2048"))
            lines.append(
                f"| {PHONE_MODELS.get(row['model'], row['model'])} | "
                f"{PHONE_ARTIFACTS.get(a['name'], a['name'])} | {a['size_mb']:.1f} MB | "
                f"{a['peak_rss_mb']:.0f} MB | "
                + (f"{vs:.2f}×" if a is gguf else f"**{vs:.2f}×**")
                + f" | {a['prefill_tok_s']:.0f} | {decode} |"
            )
    return lines


GPU_METHODS = {
    "qlora": "QLoRA (NF4, double quant, bf16 compute)",
    "lora": "LoRA (bf16 base)",
}


def gpu_qlora_section(doc: Path) -> list[str]:
    data = _json("gpu_qlora-h200.json")
    s = data["settings"]
    lines = [
        f"From {_link(doc, 'gpu_qlora-h200.json')}: one {data['gpu']}, torch {data['torch']}, "
        f"Python {data['python']}; {s['compute_dtype']} compute, batch {s['batch_size']}, "
        f"rank {s['rank']}, {s['steps']} steps:",
        "",
        f"| method | train tokens/s | peak GPU memory | {s['steps']} steps |",
        "|---|---|---|---|",
    ]
    for method, r in data["results"].items():
        lines.append(
            f"| {GPU_METHODS.get(method, method)} | {r['train_tokens_per_s']:,.0f} | "
            f"{r['peak_gpu_memory_mib']:,.0f} MiB | {r['seconds']:.1f} s |"
        )
    return lines


def bench_overhead_section(doc: Path) -> list[str]:
    data = _json("bench_overhead.json")
    (bare, bare_rounds), (ours, our_rounds) = data["rounds"].items()
    medians = data["median_tok_s"]
    spread = max(
        abs(v / statistics.median(rounds) - 1)
        for rounds in (bare_rounds, our_rounds)
        for v in rounds
    )
    return [
        f"From {_link(doc, 'bench_overhead.json')}: {ours} decoded at {data['ratio']:.2f}× the "
        f"speed of the {bare} (medians of {len(our_rounds)} rounds: {medians[ours]:.1f} against "
        f"{medians[bare]:.1f} tok/s), while single rounds lay up to {spread:.0%} from their "
        "side's median on this shared machine: the run resolves no overhead of the harness "
        "in either direction."
        if abs(data["ratio"] - 1) < spread
        else f"From {_link(doc, 'bench_overhead.json')}: {ours} decoded at "
        f"{data['ratio']:.2f}× the speed of the {bare} (medians of {len(our_rounds)} rounds: "
        f"{medians[ours]:.1f} against {medians[bare]:.1f} tok/s), outside the rounds' spread "
        f"of {spread:.0%}."
    ]


def kernel_paths_section(doc: Path) -> list[str]:
    data = _json("kernel_paths.json")
    counts = r"\d+ (?:passed|failed|errors?)"
    outcomes = [
        f"{p['name']} {', '.join(re.findall(counts, p['outcome']))} in {p['seconds']} s"
        for p in data["paths"]
    ]
    return [
        f"From {_link(doc, 'kernel_paths.json')}, the float tests on each path: "
        + "; ".join(outcomes)
        + "."
    ]


@dataclass(frozen=True)
class Section:
    """A marked section of a doc and the results file(s) it is rendered from."""

    name: str
    doc: Path
    sources: tuple[str, ...]  # under benchmarks/results/
    render: Callable[[Path], list[str]]  # the lines between the markers, given the doc


SECTIONS = (
    Section(
        "demo-results",
        README,
        ("demo.json", "demo-bench.json", "demo-bench-incontext.json"),
        demo_section,
    ),
    Section("gguf-export", README, ("gguf_export.json",), gguf_readme_section),
    Section("onnx-export", README, ("onnx_export.json",), onnx_readme_section),
    Section("case-study-settings", BENCH_README, ("case_study_settings.json",), case_study_section),
    Section("kernel-paths", BENCH_README, ("kernel_paths.json",), kernel_paths_section),
    Section("bench-overhead", BENCH_README, ("bench_overhead.json",), bench_overhead_section),
    Section("gguf-export", BENCH_README, ("gguf_export.json",), gguf_bench_section),
    Section("onnx-export", BENCH_README, ("onnx_export.json",), onnx_bench_section),
    Section("onnx-int4-recipes", BENCH_README, ("onnx_int4_recipes.json",), int4_recipes_section),
    Section("phone-memory", BENCH_README, ("phone_memory.json",), phone_memory_section),
    Section("gpu-qlora", BENCH_README, ("gpu_qlora-h200.json",), gpu_qlora_section),
)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _wrapped(lines: list[str]) -> list[str]:
    """Prose lines wrapped as the docs are (table rows and blank lines as they are)."""
    out = []
    for line in lines:
        if not line or line.startswith("|"):
            out.append(line)
        else:
            out += textwrap.wrap(line, WIDTH, break_long_words=False, break_on_hyphens=False)
    return out


def render(section: Section) -> str:
    """The section as it should stand in its doc, markers included."""
    start, end = markers(section.name)
    lines = _wrapped(section.render(section.doc))
    # a table runs on into any line that follows it: a blank line ends it before the marker
    return "\n".join([start, *lines, *([""] if lines[-1].startswith("|") else []), end])


def current(text: str, name: str) -> str | None:
    """The section ``name`` as it stands in ``text`` (markers included), None without one."""
    start, end = markers(name)
    found = re.findall(re.escape(start) + r".*?" + re.escape(end), text, re.S)
    if len(found) > 1:
        raise ValueError(f"section {name!r} is marked {len(found)} times; mark it once")
    return found[0] if found else None


def _where(section: Section) -> str:
    return f"{section.doc.relative_to(ROOT)}: {section.name}"


def _texts(docs) -> dict[Path, str]:
    return {doc: doc.read_text(encoding="utf-8") for doc in dict.fromkeys(docs)}


def rewrite(text: str, sections: tuple[Section, ...]) -> tuple[str, list[str]]:
    """``text`` (one doc) with each of ``sections`` rendered again, and the names of those
    that changed.

    Raises:
        ValueError: the doc has no markers (or two pairs) for one of the sections.
    """
    changed = []
    for section in sections:
        old = current(text, section.name)
        if old is None:
            start, end = markers(section.name)
            raise ValueError(f"{section.doc}: no {start} ... {end} to rewrite")
        block = render(section)
        if block != old:
            changed.append(_where(section))
            text = text.replace(old, block)
    return text, changed


def write(sections: tuple[Section, ...] = SECTIONS) -> list[str]:
    """Rewrite each section in its doc from the results; returns those that changed."""
    _json.cache_clear()  # a run may have just rewritten its results file
    changed = []
    for doc, text in _texts(s.doc for s in sections).items():
        new, names = rewrite(text, tuple(s for s in sections if s.doc == doc))
        if new != text:
            doc.write_text(new, encoding="utf-8")
        changed += names
    return changed


def stale_sections(
    sections: tuple[Section, ...] = SECTIONS, texts: dict[Path, str] | None = None
) -> list[str]:
    """The sections whose doc (its text in ``texts``, else on disk) differs from what the
    results give, or that are not marked."""
    texts = {**_texts(s.doc for s in sections), **(texts or {})}
    stale = []
    for section in sections:
        old = current(texts[section.doc], section.name)
        if old is None:
            stale.append(f"{_where(section)} (not marked)")
        elif old != render(section):
            stale.append(_where(section))
    return stale


# ---------------------------------------------------------------------------------------------
# Figures quoted in the prose around the sections: each passage as its results file gives it.


def _demo(label: str) -> dict:
    """A model's figures in demo.json."""
    return _json("demo.json")["models"][label]


def _incontext() -> list[str]:
    return list(_json("demo.json")["incontext_labels"].values())


def _correct(label: str) -> int:
    return sum(r["correct"] for r in _json("demo.json")["replies"][label]["cooking"])


def _general_ratio(label: str) -> float:
    return _demo(label)["general_perplexity"] / _demo(BASE)["general_perplexity"]


def _words(value: float, words: dict[int, str]) -> str:
    """``value`` rounded, as a word where ``words`` has one."""
    return words.get(round(value), f"{value:.0f}")


def _listed(items: list[str]) -> str:
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else items[0]


def f_demo_minutes() -> str:
    record = _json("demo.json")
    wall = record["wall_seconds"]
    training = sum(v for k, v in record["seconds"].items() if k.startswith("train "))
    thirds = _words(3 * training / wall, {1: "a third", 2: "two thirds"})
    return f"about {wall / 60:.0f} minutes on 2 CPU cores, {thirds} of it the two fine-tunings"


def f_demo_lead() -> str:
    tuned = _demo(TUNED)["task_accuracy"]
    leads = sorted(100 * (tuned - _demo(x)["task_accuracy"]) for x in _incontext())
    return f"fine-tuning's lead over it is {leads[0]:.0f} to {leads[-1]:.0f} points"


def f_demo_ttft() -> str:
    llama, genai = _incontext()
    shorter = _demo(llama)["prompt_tokens"] / _demo(TUNED)["prompt_tokens"]
    return (
        f"{_words(shorter, {10: 'ten'})} times shorter, a TTFT of "
        f"{_demo('GGUF Q8_0')['ttft_ms']:.0f} ms instead of {_demo(llama)['ttft_ms']:.0f} ms in "
        f"llama.cpp and {_demo('ONNX int8')['ttft_ms']:.0f} ms instead of "
        f"{_demo(genai)['ttft_ms']:.0f} ms in onnxruntime-genai"
    )


def f_demo_perplexity() -> str:
    labels = _json("demo.json")["labels"].values()
    exports = sorted(_general_ratio(x) for x in labels if x.startswith(("GGUF", "ONNX")))
    return (
        f"general-text perplexity is {_general_ratio(TUNED):.2f}× the base's for the QLoRA model "
        f"and {_general_ratio(TUNED_LORA):.2f}× for LoRA ({exports[0]:.2f}× to "
        f"{exports[-1]:.2f}× for the exports)"
    )


def f_demo_general() -> tuple[str, ...]:
    (q, n), (lora, _), (floor, _) = (_demo(x)["general_kept"] for x in (TUNED, TUNED_LORA, BASE_Q8))
    dev = _json("case_study_settings.json")
    dev_floor, dev_n = _kept(dev["base"], dev["base_q8_0"])
    return (
        f"the QLoRA model keeps {q} of the {n} test questions the base answers ({q / n:.0%}), "
        f"LoRA {lora} ({lora / n:.0%})",
        f"The base model's own Q8_0 file keeps {floor} ({floor / n:.0%})",
        f"(on dev it keeps {dev_floor} of {dev_n}, {dev_floor / dev_n:.0%})",
    )


def _imatrix(kind: str, quant: str = "q4_k_m") -> float:
    rows = _json("gguf_imatrix.json")["rows"]
    return next(r for r in rows if r["type"] == quant and r["imatrix"] == kind)["mean_kl"]


def f_demo_4bit() -> str:
    return (
        f"(mean KL {_imatrix('edgeft imatrix'):.3f} against the fine-tuned model, "
        f"{_imatrix('none'):.3f} without one), ONNX int4 with GPTQ "
        f"({_demo('ONNX int4')['vs']['merged']['mean_kl']:.3f})"
    )


def f_demo_lora_qlora() -> tuple[str, ...]:
    record = _json("demo.json")
    runs = record["runs"]
    same = "the same" if _correct(TUNED) == _correct(TUNED_LORA) else "a different"
    gb = [runs[m]["peak_rss_mb"] / 1000 for m in ("lora", "qlora")]
    return (
        f"LoRA and QLoRA land on {same} cooking accuracy ({_correct(TUNED)} of "
        f"{len(record['replies'][TUNED]['cooking'])})",
        f"({runs['lora']['seconds']:.0f} and {runs['qlora']['seconds']:.0f} s)",
        f"({gb[0]:.1f} and {gb[1]:.1f} GB peak for the training processes",
    )


def _dev(name: str) -> tuple[int, int, float]:
    """(kept, answered, general perplexity × the base's) of a setting on the dev sets."""
    data = _json("case_study_settings.json")
    kept, answered = _kept(data["base"], data["settings"][name])
    return kept, answered, data["settings"][name]["general_ppl"] / data["base"]["general_ppl"]


def f_preserve_rows() -> str:
    (a, n, ra), (b, _, rb), (c, _, rc) = (
        _dev(f"extra, {rows}, 2 epochs, lr 2e-3")
        for rows in (
            "replay 15",
            "111 replay rows as KL to base (weight 1)",
            "248 replay rows as KL to base (weight 1)",
        )
    )
    return (
        f"kept {a} of the {n} general questions the base answers at {ra:.2f}× its general-text "
        f"perplexity; as preserve rows, {b} at {rb:.2f}× (with 137 short general questions "
        f"added, {c} at {rc:.2f}×)"
    )


def f_merge_scale() -> str:
    data = _json("case_study_settings.json")
    rows = [
        row
        for name, row in data["settings"].items()
        if merged_at_scale(name) and row["settings"]["method"] == "qlora"
    ]
    scales = _listed([f"{row['scale']:g}" for row in rows])
    cooking = _listed([f"{row['cooking']:.0%}" for row in rows])
    kept = _listed([f"{retention(data['base'], row):.0%}" for row in rows])
    return (
        f"adapter merged at {scales} answers {cooking} of the cooking questions and keeps {kept} "
        "of the general questions the base answers"
    )


def f_norm_tuning_peak() -> str:
    rows = {row["model"]: row for row in _json("phone_memory.json")["rows"]}
    peak = rows["llama-3.2-1b"]["onnx_export"]["peak_rss_mb"] / 1000
    return f"a Llama-3.2-1B shape peaked at {peak:.1f} GB that way"


def f_scale() -> tuple[str, ...]:
    rows = {row["model"]: row for row in _json("scale.json")["rows"]}
    small, big, one, eight = (
        rows[m] for m in ("smollm2-135m", "smollm2-1.7b", "llama-3.2-1b", "llama-3.1-8b")
    )

    def gb(mb: float, digits: int = 2) -> str:
        return f"{mb / 1000:.{digits}f} GB"

    return (
        f"the merge's peak RSS goes from {gb(small['merge']['peak_rss_mb'])} at 135M to "
        f"{gb(big['merge']['peak_rss_mb'])} at 1.7B parameters",
        f"at 1.7B the GGUF export's own process peaks at {gb(big['gguf']['export_rss_mb'])} and "
        f"the ONNX int4 export's at {gb(big['onnx']['export_rss_mb'])} "
        f"({big['onnx']['seconds'] / 60:.0f} minutes with GPTQ)",
        f"{gb(one['gguf']['export_rss_mb'], 1)} for a Llama-3.2-1B shape",
        f"({eight['disk_mb'] / 1000:.0f} GB in bf16) merges in "
        f"{eight['merge']['seconds'] / 60:.0f} minutes at {gb(eight['merge']['peak_rss_mb'])} "
        f"and exports to GGUF Q4_K_M in {eight['gguf']['seconds'] / 60:.0f} minutes at "
        f"{gb(eight['gguf']['export_rss_mb'])}",
        f"peaks at {gb(eight['train']['peak_rss_mb'], 1)}, as training holds the whole model",
    )


def f_imatrix() -> str:
    others = _listed(
        [
            f"{q.upper()} {_imatrix('none', q):.2f} → {_imatrix('edgeft imatrix', q):.2f}"
            for q in ("q4_0", "iq4_xs", "iq3_m", "q2_k")
        ]
    )
    return (
        f"Q4_K_M {_imatrix('none'):.3f} → {_imatrix('edgeft imatrix'):.3f} (llama.cpp's own "
        f"`llama-imatrix` on the same rows: {_imatrix('llama-imatrix'):.3f}; the ONNX int4, "
        f"GPTQ on the same data: {_imatrix('fine-tuning data', 'int4 (ONNX, GPTQ)'):.3f}), "
        f"{others}"
    )


def f_lora_gguf_size() -> str:
    sizes = [a["bytes"] / 1e6 for a in _json("lora_switch.json")["export"]["gguf_lora"].values()]
    return f"(F16 by default, {max(sizes):.0f} MB for rank 32 on SmolLM2-135M)"


def f_onnx_builder_kl() -> str:
    a = _json("onnx_export.json")["artifacts"]
    share = a["genai builder int4"]["heldout_mean_kl"] / a["edgeft int4"]["heldout_mean_kl"]
    return f"at {_words(share, {4: 'a quarter', 5: 'a fifth', 6: 'a sixth'})} of its KL"


def f_onnx_fp32() -> str:
    kl = _json("onnx_export.json")["artifacts"]["edgeft fp32"]["mean_kl"]
    return f"(measured on the demo's fine-tune: mean KL {kl:.0e}"


def f_phone_ratio() -> str:
    ratios = sorted(
        {
            f"{a['peak_rss_mb'] / row['artifacts'][0]['peak_rss_mb']:.2f}×"
            for row in _json("phone_memory.json")["rows"]
            for a in row["artifacts"][1:]
        }
    )
    return f"peaks at {' to '.join(ratios)} llama.cpp Q4_K_M's RSS"


def f_bench_demo_time() -> tuple[str, ...]:
    record = _json("demo.json")
    t, runs = record["seconds"], record["runs"]
    per_step = [runs[m]["seconds"] / runs[m]["steps"] for m in ("qlora", "lora")]
    return (
        f"Whole demo: {record['wall_seconds'] / 60:.1f} min.",
        f"QLoRA {t['train qlora']:.0f} s and LoRA {t['train lora']:.0f} s "
        f"({runs['qlora']['steps']} steps each, {per_step[0]:.1f} and {per_step[1]:.1f} s a step",
        f"ONNX export {t['export onnx']:.0f} s",
        f"GGUF {t['export gguf']:.0f} s",
        f"zero-shot models {t['bench']:.0f} s",
        f"in-context bench {t['bench in-context']:.0f} s",
        f"the two fine-tunings alone take {(t['train qlora'] + t['train lora']) / 60:.0f} minutes",
    )


def f_bench_incontext() -> tuple[str, ...]:
    llama, genai = _incontext()
    replies = _json("demo.json")["replies"]
    a, b = ([r["correct"] for r in replies[x]["cooking"]] for x in (llama, genai))
    return (
        f"reaches {_demo(llama)['task_accuracy']:.1%} (llama.cpp) and "
        f"{_demo(genai)['task_accuracy']:.1%} (onnxruntime-genai)",
        f"({sum(a)} and {sum(b)} answers: the two quantized bases differ on "
        f"{sum(x != y for x, y in zip(a, b, strict=True))} of the {len(a)} questions)",
        f"TTFT {_demo('GGUF Q8_0')['ttft_ms']:.0f} against {_demo(llama)['ttft_ms']:.0f} ms "
        f"(llama.cpp) and {_demo('ONNX int8')['ttft_ms']:.0f} against "
        f"{_demo(genai)['ttft_ms']:.0f} ms (onnxruntime-genai)",
    )


@dataclass(frozen=True)
class Figure:
    """Passages of a doc's prose that quote a results file."""

    doc: Path
    source: str  # under benchmarks/results/
    passages: Callable[[], str | tuple[str, ...]]  # as the results file gives them


FIGURES = (
    Figure(README, "demo.json", f_demo_minutes),
    Figure(README, "case_study_settings.json", f_preserve_rows),
    Figure(README, "case_study_settings.json", f_merge_scale),
    Figure(README, "phone_memory.json", f_norm_tuning_peak),
    Figure(README, "scale.json", f_scale),
    Figure(README, "gguf_imatrix.json", f_imatrix),
    Figure(README, "lora_switch.json", f_lora_gguf_size),
    Figure(README, "onnx_export.json", f_onnx_builder_kl),
    Figure(README, "onnx_export.json", f_onnx_fp32),
    Figure(README, "phone_memory.json", f_phone_ratio),
    Figure(README, "demo.json", f_demo_lead),
    Figure(README, "demo.json", f_demo_ttft),
    Figure(README, "demo.json", f_demo_perplexity),
    Figure(README, "demo.json", f_demo_general),
    Figure(README, "gguf_imatrix.json", f_demo_4bit),
    Figure(README, "demo.json", f_demo_lora_qlora),
    Figure(BENCH_README, "demo.json", f_bench_demo_time),
    Figure(BENCH_README, "demo.json", f_bench_incontext),
)


def _flat(text: str) -> str:
    return " ".join(text.split())


def passages(figure: Figure) -> tuple[str, ...]:
    found = figure.passages()
    return (found,) if isinstance(found, str) else found


def stale_figures(
    figures: tuple[Figure, ...] = FIGURES, texts: dict[Path, str] | None = None
) -> list[str]:
    """Each passage that its doc (its text in ``texts``, else on disk) does not quote as its
    results file gives it."""
    texts = {**_texts(f.doc for f in figures), **(texts or {})}
    flat = {doc: _flat(text) for doc, text in texts.items()}
    return [
        f"{f.doc.relative_to(ROOT)}: no '{passage}' (from results/{f.source})"
        for f in figures
        for passage in passages(f)
        if _flat(passage) not in flat[f.doc]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 naming each section or quoted figure that differs",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_sections() + stale_figures()
        for line in stale:
            print(f"differs from the results: {line}")
        return 1 if stale else 0
    for line in write():
        print(f"rewrote {line}")
    for line in stale_figures():
        print(f"differs from the results (prose, edit by hand): {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
