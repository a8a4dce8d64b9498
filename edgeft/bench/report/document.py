"""The content of a bench report as a list of blocks, and the formats of its figures.

A results object becomes one list of blocks (headings, paragraphs, lists, tables, plots);
``edgeft.bench.report.markdown`` and ``edgeft.bench.report.html`` render the same list, so
``report.md`` and ``report.html`` always carry the same content. A ``null`` or missing figure
prints as ``MISSING``, never as 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.bench.report.pareto import _front_points, pareto_front
from edgeft.bench.report.read import (
    _artifacts,
    _decode_entry,
    _depths,
    _first_depth,
    _get,
    _has_predictions,
    _list,
    _median,
    _name,
    _num,
    _ok,
    _references,
    _size_mb,
    _task_accuracy,
    _vs,
)

MISSING = "-"
PASS = "✓"
MISS = "✗"
WORSE = "⚠ worse"

# name -> title (also the alt text in report.html); the order is the order in the reports.
PLOTS = {
    "decode_vs_size": "Decode speed against file size",
    "kl_vs_size": "Mean KL against file size",
    "ttft": "Time to first token",
    "accuracy": "Accuracy per artifact",
}

# budget name -> (what it limits, comparison, unit); unknown names print as they are.
BUDGETS = {
    "max_size_mb": ("file size", "≤", "MB"),
    "max_rss_mb": ("peak RSS", "≤", "MB"),
    "min_decode_tok_s": ("decode speed", "≥", "tok/s"),
    "max_ttft_ms": ("time to first token", "≤", "ms"),
    "max_mean_kl": ("mean KL", "≤", "nats"),
    "min_task_accuracy": ("task accuracy", "≥", ""),
}

_ERROR_CHARS = 120  # error messages in table cells are cut here; the full text follows the table


# --- formatting --------------------------------------------------------------------------------


def _fixed(value: Any, digits: int = 1) -> str:
    x = _num(value)
    if x is None:
        return MISSING
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def _pct(fraction: Any) -> str:
    x = _num(fraction)
    if x is None or not math.isfinite(x):
        return _fixed(x)
    return f"{_fixed(x * 100)}%"


def _kl(value: Any) -> str:
    """KL in nats: 4 significant digits, scientific below 0.001."""
    x = _num(value)
    if x is None:
        return MISSING
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    return f"{x:.3e}" if abs(x) < 1e-3 else f"{x:.4g}"


def _g(value: Any) -> str:
    x = _num(value)
    return MISSING if x is None else f"{x:.4g}"


def _short(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first_line(text: Any, limit: int = _ERROR_CHARS) -> str:
    lines = str(text).strip().splitlines() or [""]
    return _short(lines[0], limit)


def _budget_figure(name: str, value: Any) -> str:
    if name == "max_mean_kl":
        return _kl(value)
    if name in ("max_size_mb", "max_rss_mb", "min_decode_tok_s", "max_ttft_ms"):
        return _fixed(value)
    return _g(value)


def _budget_limit(name: str, limit: Any) -> str:
    what, op, unit = BUDGETS.get(name, (name, "limit", ""))
    text = f"{what} {op} {_budget_figure(name, limit)}"
    return f"{text} {unit}".rstrip() + (f" ({name})" if name in BUDGETS else "")


# --- the document ------------------------------------------------------------------------------


@dataclass
class Table:
    """A table block: a cell starting with ``MISS`` is highlighted, one equal to ``PASS`` is
    marked as passed."""

    headers: list[str]
    align: str  # one "l" or "r" per column
    rows: list[list[str]] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)  # per row: the artifact failed


# A block is (kind, payload): ("h1"|"h2"|"p", str), ("ul", [str]), ("kv", [(label, str)]),
# ("table", Table) or ("plots", {name: Path}, titled by PLOTS where the name is there);
# to_markdown and to_html render a list of them.
_Block = tuple[str, Any]


def _decode_cell(artifact: dict, depth: int) -> str:
    entry = _decode_entry(artifact, depth)
    text = _fixed(_median(_get(entry, "tok_s")))
    predicted = _num(_get(entry, "predicted_tok_s"))
    return text if predicted is None else f"{text} ({_fixed(predicted)})"


def _budget_cell(artifact: dict) -> str:
    if not _ok(artifact):
        return f"{MISS} failed: {_first_line(artifact.get('error') or 'no error message')}"
    entries = [b for b in _list(artifact.get("budgets")) if isinstance(b, dict)]
    missed = [str(b.get("name", "?")) for b in entries if not b.get("passed")]
    if missed:
        return f"{MISS} " + ", ".join(missed)
    if artifact.get("passed") is False:
        return MISS
    return PASS if entries else MISSING


def _main_table(results: dict) -> Table:
    depths = _depths(results)
    d0 = _first_depth(results)
    refs = _references(results)
    ref = refs[0] if refs else None
    headers = ["artifact", "runtime", "quant", "size MB", "load s", "TTFT ms", "prefill tok/s"]
    headers += [f"decode tok/s @{d}" for d in depths]
    headers += [f"p50/p99 token ms @{d0}", "peak RSS MB", "perplexity"]
    if ref is not None:
        headers += [f"mean KL vs {ref}", f"top-1 vs {ref}"]
    headers += ["task accuracy", "budgets"]
    table = Table(headers, "lll" + "r" * (len(headers) - 4) + "l")
    for a in _artifacts(results):
        row = [_name(a), str(a.get("runtime") or MISSING), str(a.get("quant") or MISSING)]
        if _ok(a):
            latency = a.get("latency")
            token_ms = _get(_decode_entry(a, d0), "token_ms")
            p50, p99 = _get(token_ms, "p50"), _get(token_ms, "p99")
            row += [
                _fixed(_size_mb(a)),
                _fixed(_get(latency, "load_s"), 2),
                _fixed(_median(_get(latency, "ttft_ms"))),
                _fixed(_median(_get(latency, "prefill_tok_s"))),
                *[_decode_cell(a, d) for d in depths],
                MISSING if p50 is None and p99 is None else f"{_fixed(p50)} / {_fixed(p99)}",
                _fixed(_get(latency, "peak_rss_mb")),
                _fixed(_get(a, "accuracy", "perplexity"), 2),
            ]
            if ref is not None:
                row += [_kl(_vs(a, ref, "mean_kl")), _pct(_vs(a, ref, "top1_agreement"))]
            row.append(_pct(_task_accuracy(a)))
        else:
            row += [MISSING] * (len(headers) - 4)
        row.append(_budget_cell(a))
        table.rows.append(row)
        table.failed.append(not _ok(a))
    return table


def _other_references_table(results: dict) -> Table | None:
    others = _references(results)[1:]
    if not others:
        return None
    headers = ["artifact"]
    for ref in others:
        headers += [f"mean KL vs {ref}", f"top-1 vs {ref}"]
    table = Table(headers, "l" + "r" * (len(headers) - 1))
    for a in _artifacts(results):
        row = [_name(a)]
        for ref in others:
            row += [_kl(_vs(a, ref, "mean_kl")), _pct(_vs(a, ref, "top1_agreement"))]
        table.rows.append(row)
        table.failed.append(not _ok(a))
    return table


def _run_facts(results: dict) -> list[tuple[str, str]]:
    machine = results.get("machine")
    cores = _get(machine, "cores")
    cpu = str(_get(machine, "cpu") or MISSING) + (f", {cores} cores" if cores is not None else "")
    bandwidth = _num(_get(machine, "bandwidth_gbs"))
    versions = results.get("versions")
    runtime_versions = ", ".join(
        f"{pkg} {ver if ver is not None else 'not installed'}"
        for pkg, ver in (versions.items() if isinstance(versions, dict) else [])
        if pkg != "edgeft"  # named first, from edgeft_version
    )
    return [
        ("Created", str(results.get("created") or MISSING)),
        (
            "Machine",
            f"{cpu}; {_get(machine, 'system') or MISSING}; "
            f"{_fixed(_get(machine, 'ram_gb'))} GB RAM; read bandwidth "
            + (f"{bandwidth:.1f} GB/s" if bandwidth is not None else "not measured"),
        ),
        (
            "Versions",
            f"edgeft {results.get('edgeft_version') or MISSING}"
            + (f"; {runtime_versions}" if runtime_versions else ""),
        ),
    ]


def _settings_facts(results: dict) -> list[tuple[str, str]]:
    s = results.get("settings")
    depths = _get(s, "depths")
    eval_path = _get(s, "eval", "path")
    task = _get(s, "task")
    if isinstance(task, dict):
        task_text = (
            f"{task.get('path', MISSING)} ({task.get('questions', MISSING)} questions, "
            f"up to {task.get('max_new_tokens', MISSING)} new tokens each)"
        )
    else:
        task_text = "none"

    def text(key: str) -> str:
        value = _get(s, key)
        return MISSING if value is None else str(value)

    return [
        ("Threads", text("threads")),
        ("Prompt tokens", text("prompt_tokens")),
        ("Decode tokens", text("decode_tokens")),
        ("Depths", ", ".join(str(d) for d in depths) if isinstance(depths, list) else MISSING),
        ("Repeats", f"{text('repeats')} (after {text('warmup')} warm-up)"),
        (
            "Eval text",
            f"{_get(s, 'eval', 'tokens') or MISSING} tokens of "
            + (str(eval_path) if eval_path else "the built-in text"),
        ),
        ("Task file", task_text),
    ]


def _device_blocks(device: Any) -> list[_Block]:
    if not isinstance(device, dict):
        return []
    title = device.get("title") or device.get("name") or "?"
    applied = [str(x) for x in _list(device.get("applied"))]
    not_emulated = [str(x) for x in _list(device.get("not_emulated"))]
    return [
        ("h2", "Device profile"),
        (
            "p",
            f"Emulated device: {title} ({device.get('name', MISSING)}): memory bandwidth "
            f"{_fixed(device.get('bandwidth_gbs'))} GB/s, {_fixed(device.get('ram_gb'))} GB "
            f"RAM, {device.get('threads', MISSING)} threads.",
        ),
        (
            "kv",
            [
                ("Emulated here", "; ".join(applied) or "nothing"),
                ("Not emulated", "; ".join(not_emulated) or "nothing listed"),
            ],
        ),
        (
            "p",
            "Figures in parentheses in the decode columns are predictions for this device; "
            "every other figure was measured on this machine.",
        ),
    ]


def _budget_blocks(results: dict) -> list[_Block]:
    configured = results.get("budgets")
    configured = configured if isinstance(configured, dict) else {}
    limits = {k: v for k, v in configured.items() if _num(v) is not None}
    artifacts = _artifacts(results)
    for a in artifacts:  # a budget an artifact was checked against but the run does not list
        for b in _list(a.get("budgets")):
            if isinstance(b, dict) and "name" in b:
                limits.setdefault(str(b["name"]), b.get("limit"))
    if not limits:
        return [("h2", "Budgets"), ("p", "No budgets were set.")]
    items = []
    for name, limit in limits.items():
        missed = []
        for a in artifacts:
            for b in _list(a.get("budgets")):
                if isinstance(b, dict) and b.get("name") == name and not b.get("passed"):
                    value = b.get("value")
                    shown = "not measured" if value is None else _budget_figure(name, value)
                    missed.append(f"{_name(a)} ({shown})")
        verdict = "missed by " + ", ".join(missed) if missed else "met by every measured artifact"
        items.append(f"{_budget_limit(name, limit)}: {verdict}")
    failed = [_name(a) for a in artifacts if not _ok(a)]
    if failed:
        items.append("Failed, so checked against nothing: " + ", ".join(failed))
    verdict = "yes" if results.get("passed") else "no"
    return [("h2", "Budgets"), ("ul", items), ("p", f"Every artifact met every budget: {verdict}.")]


def _pareto_blocks(results: dict) -> list[_Block]:
    speed, kl, d0, ref = _front_points(results)
    fast = pareto_front(speed, minimize_x=True, minimize_y=False)
    accurate = pareto_front(kl, minimize_x=True, minimize_y=True)
    items = [
        f"Small and fast (size vs decode tok/s @{d0}): " + (", ".join(fast) or "no data"),
        f"Small and accurate (size vs mean KL vs {ref or MISSING}): "
        + (", ".join(accurate) or "no data"),
    ]
    return [("h2", "Pareto front"), ("ul", items)]


def _notes_blocks(results: dict) -> list[_Block]:
    items = []
    for a in _artifacts(results):
        if not _ok(a):
            items.append(f"{_name(a)} failed: {a.get('error') or 'no error message'}")
        if _get(a, "accuracy", "tokenizer_matches_reference") is False:
            items.append(
                f"{_name(a)}: its tokenizer differs from the reference's, so its "
                "perplexity and KL are not comparable with the others"
            )
        for note in _list(a.get("notes")):
            items.append(f"{_name(a)}: {note}")
    return [("h2", "Notes"), ("ul", items)] if items else []


def _how_to_read(results: dict) -> list[_Block]:
    refs = _references(results)
    ref = refs[0] if refs else "the reference"
    repeats = _get(results, "settings", "repeats")
    prompt = _get(results, "settings", "prompt_tokens")
    d0 = _first_depth(results)
    items = [
        f"Mean KL: the KL divergence between the next-token distributions of {ref} and of the "
        "artifact, averaged over the positions of the eval text, in nats. 0 means identical; "
        "as a rough guide, below 0.01 is close to lossless and around 0.1 is a visible "
        "quantization loss.",
        f"Top-1: the share of positions where the artifact's most likely next token is the "
        f"same as {ref}'s.",
        "Perplexity: on the eval text; comparable only between artifacts with the same tokenizer.",
        f"Speed figures are medians over {repeats if repeats is not None else MISSING} repeats. "
        "Decode tok/s @d is the speed with d tokens already in the context; TTFT is the time to "
        f"the first token of a {prompt if prompt is not None else MISSING}-token prompt; "
        f"p50/p99 are per-token latencies at depth {d0}.",
        "Peak RSS: the artifact's own process, load and run.",
    ]
    if isinstance(results.get("device"), dict) or _has_predictions(results):
        items.append(
            "A figure in parentheses is a prediction for the device profile, derived from this "
            "machine's measurement and the profile's memory bandwidth; it is an estimate, not a "
            "measurement on the device."
        )
    items += [
        "Pareto front: the artifacts that no other artifact beats on both figures at once.",
        f'"{MISSING}" means not measured, or the artifact failed.',
    ]
    return [("h2", "How to read this"), ("ul", items)]


def _document(results: dict, plots: Mapping[str, Path] | None) -> list[_Block]:
    blocks: list[_Block] = [("h1", "edgeft bench report")]
    blocks += [("kv", _run_facts(results)), ("h2", "Settings"), ("kv", _settings_facts(results))]
    blocks += _device_blocks(results.get("device"))
    blocks += [("h2", "Results"), ("table", _main_table(results))]
    others = _other_references_table(results)
    if others is not None:
        blocks += [("h2", "Other references"), ("table", others)]
    blocks += _notes_blocks(results)
    blocks += _budget_blocks(results)
    blocks += _pareto_blocks(results)
    if plots:
        blocks += [("h2", "Plots"), ("plots", dict(plots))]
    blocks += _how_to_read(results)
    return blocks
