"""Readable reports of ``edgeft bench``: ``report.md``, ``report.html`` and ``plots/*.png``.

Both reports are rendered from one list of blocks (headings, paragraphs, lists, tables, plots),
so the markdown and the HTML always carry the same content. Every figure is read defensively:
a ``null`` or missing value prints as ``-`` and is left out of the plots, never drawn as 0.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft._io import write_bytes, write_text
from edgeft.bench.schema import validate

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

# Speed and memory figures vary a few percent between identical runs on a busy host; a change
# worse than this is flagged in a comparison.
SPEED_WORSE = 0.05
# Mean KL does not vary between runs of the same file and runtime, so any change comes from a
# different file or runtime; it is flagged when it rises by more than this many nats, the size
# of the whole fp32 to q8_0 gap in the schema's example results.
KL_WORSE = 0.01
# Task accuracy is flagged when it drops by more than this (a fraction: 2 percentage points,
# a little over one question of a 67-question task file).
TASK_WORSE = 0.02
# Perplexity scales differ between models, so its threshold is relative.
PERPLEXITY_WORSE = 0.02

_ERROR_CHARS = 120  # error messages in table cells are cut here; the full text follows the table
_LABEL_CHARS = 28  # point and bar labels in plots are cut here


# --- reading figures ---------------------------------------------------------------------------


def _get(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...``, or None where a level is missing or not an object."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    """A number as float; None for null, booleans and anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(value: Any) -> float | None:
    x = _num(value)
    return x if x is not None and math.isfinite(x) else None


def _median(stat: Any) -> float | None:
    """The median of a STAT (a bare number is accepted as its own median)."""
    if isinstance(stat, dict):
        return _num(stat.get("median"))
    return _num(stat)


def _ok(artifact: dict) -> bool:
    return artifact.get("status") == "ok"


def _name(artifact: dict) -> str:
    return str(artifact.get("name", "?"))


def _artifacts(results: dict) -> list[dict]:
    artifacts = results.get("artifacts")
    if not isinstance(artifacts, list):
        return []
    return [a for a in artifacts if isinstance(a, dict)]


def _size_mb(artifact: dict) -> float | None:
    size = _num(artifact.get("size_bytes"))
    return None if size is None else size / 1e6


def _decode_entry(artifact: dict, depth: int) -> dict | None:
    entries = _get(artifact, "latency", "decode")
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("depth") == depth:
            return entry
    return None


def _decode_tok_s(artifact: dict, depth: int) -> float | None:
    return _median(_get(_decode_entry(artifact, depth), "tok_s"))


def _vs(artifact: dict, reference: str | None, key: str) -> float | None:
    if reference is None:
        return None
    return _num(_get(artifact, "accuracy", "vs", reference, key))


def _task_accuracy(artifact: dict) -> float | None:
    return _num(_get(artifact, "accuracy", "task", "accuracy"))


def _depths(results: dict) -> list[int]:
    """The decode depths of the settings and of any artifact, ascending."""
    depths = set()
    configured = _get(results, "settings", "depths")
    if isinstance(configured, list):
        depths.update(d for d in configured if isinstance(d, int) and not isinstance(d, bool))
    for artifact in _artifacts(results):
        entries = _get(artifact, "latency", "decode")
        for entry in entries if isinstance(entries, list) else []:
            depth = _get(entry, "depth")
            if isinstance(depth, int) and not isinstance(depth, bool):
                depths.add(depth)
    return sorted(depths)


def _first_depth(results: dict) -> int:
    """Depth 0 when measured, else the shallowest depth (0 when there are none)."""
    depths = _depths(results)
    return 0 if 0 in depths or not depths else depths[0]


def _references(results: dict) -> list[str]:
    """Reference names: the run's list, else the names the artifacts were compared with."""
    names: list[str] = []
    refs = results.get("references")
    for ref in refs if isinstance(refs, list) else []:
        name = _get(ref, "name")
        if isinstance(name, str) and name not in names:
            names.append(name)
    if names:
        return names
    for artifact in _artifacts(results):
        vs = _get(artifact, "accuracy", "vs")
        for name in vs if isinstance(vs, dict) else []:
            if name not in names:
                names.append(str(name))
    return names


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
    if x is None:
        return MISSING
    if not math.isfinite(x):
        return str(x)
    return f"{x * 100:.1f}%"


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
    headers: list[str]
    align: str  # one "l" or "r" per column
    rows: list[list[str]] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)  # per row: the artifact failed


# A block is (kind, payload): ("h1"|"h2"|"p", str), ("ul", [str]), ("kv", [(label, str)]),
# ("table", Table) or ("plots", {name: Path}); to_markdown and to_html render a list of them.
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


def _front_points(results: dict) -> tuple[list, list, int, str | None]:
    d0 = _first_depth(results)
    refs = _references(results)
    ref = refs[0] if refs else None
    speed, kl = [], []
    for a in _artifacts(results):
        size = _finite(_size_mb(a))
        if not _ok(a) or size is None:
            continue
        tok_s = _finite(_decode_tok_s(a, d0))
        if tok_s is not None:
            speed.append((_name(a), size, tok_s))
        mean_kl = _finite(_vs(a, ref, "mean_kl"))
        if mean_kl is not None:
            kl.append((_name(a), size, mean_kl))
    return speed, kl, d0, ref


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


def _has_predictions(results: dict) -> bool:
    for artifact in _artifacts(results):
        entries = _get(artifact, "latency", "decode")
        for entry in entries if isinstance(entries, list) else []:
            if _num(_get(entry, "predicted_tok_s")) is not None:
                return True
    return False


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


# --- markdown ----------------------------------------------------------------------------------


def _md(text: str) -> str:
    """Inline text for markdown: no raw HTML, one line."""
    return " ".join(str(text).replace("&", "&amp;").replace("<", "&lt;").split())


def _md_cell(text: str) -> str:
    return _md(text).replace("\\", "\\\\").replace("|", "\\|")


def _md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.headers) + " |"]
    lines.append("|" + "|".join("---:" if a == "r" else "---" for a in table.align) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return lines


def to_markdown(blocks: list[_Block]) -> str:
    """Blocks as markdown; plots are linked as ``plots/<file name>``."""
    lines: list[str] = []
    for kind, payload in blocks:
        if kind == "h1":
            lines += [f"# {_md(payload)}", ""]
        elif kind == "h2":
            lines += [f"## {_md(payload)}", ""]
        elif kind == "p":
            lines += [_md(payload), ""]
        elif kind == "ul":
            lines += [f"- {_md(item)}" for item in payload] + [""]
        elif kind == "kv":
            lines += [f"- **{label}:** {_md(value)}" for label, value in payload] + [""]
        elif kind == "table":
            lines += _md_table(payload) + [""]
        elif kind == "plots":
            for name, path in payload.items():
                lines += [f"![{_md(PLOTS.get(name, name))}](plots/{Path(path).name})", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(results: dict, *, plots: Mapping[str, Path] | None = None) -> str:
    """Render a results object as ``report.md``.

    Args:
        results: a results object (see ``edgeft.bench.schema``).
        plots: plot name -> PNG path, linked as ``plots/<file name>`` (the layout
            ``write_reports`` writes); none when omitted.

    Returns:
        The markdown text.
    """
    return to_markdown(_document(results, plots))


# --- HTML --------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b;
       max-width: 90rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.5rem 0; }
th, td { border: 1px solid #d0d0d0; padding: 0.3rem 0.55rem; white-space: nowrap; }
th { background: #f3f3f3; white-space: normal; }
td.r { text-align: right; font-variant-numeric: tabular-nums; }
td.miss { background: #fde4e2; color: #8c1010; font-weight: 600; white-space: normal; }
td.pass { color: #16632c; }
tr.failed td { color: #777; }
tr.failed td.miss { color: #8c1010; }
ul.kv { list-style: none; padding-left: 0; }
figure { margin: 1rem 0; } img { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
figcaption { font-size: 0.85rem; color: #555; }
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(table: Table) -> list[str]:
    out = ['<div class="scroll"><table>', "<thead><tr>"]
    out.append("".join(f"<th>{_h(h)}</th>" for h in table.headers) + "</tr></thead><tbody>")
    for row, failed in zip(table.rows, table.failed, strict=True):
        cells = []
        for cell, align in zip(row, table.align, strict=True):
            cls = "miss" if cell.startswith(MISS) else "pass" if cell == PASS else align
            cells.append(f'<td class="{cls}">{_h(cell)}</td>')
        out.append(('<tr class="failed">' if failed else "<tr>") + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return out


def to_html(blocks: list[_Block], title: str = "edgeft bench report") -> str:
    """Blocks as one self-contained HTML page (inline CSS, plots embedded)."""
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">']
    out += ['<meta name="viewport" content="width=device-width, initial-scale=1">']
    out += [f"<title>{_h(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for kind, payload in blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{_h(payload)}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_h(item)}</li>" for item in payload) + "</ul>")
        elif kind == "kv":
            items = "".join(f"<li><b>{_h(k)}:</b> {_h(v)}</li>" for k, v in payload)
            out.append(f'<ul class="kv">{items}</ul>')
        elif kind == "table":
            out += _html_table(payload)
        elif kind == "plots":
            for name, path in payload.items():
                data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
                title = _h(PLOTS.get(name, name))
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{title}">'
                    f"<figcaption>{title}</figcaption></figure>"
                )
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def render_html(results: dict, plots: Mapping[str, Path]) -> str:
    """Render a results object as one self-contained ``report.html``.

    The CSS is inline and each plot is embedded as a base64 ``data:`` URI, so the file needs
    nothing else; every value from the results is HTML-escaped.

    Args:
        results: a results object (see ``edgeft.bench.schema``).
        plots: plot name -> PNG path (as ``plot_files`` returns); may be empty.

    Returns:
        The HTML text.

    Raises:
        FileNotFoundError: a plot path does not exist.
    """
    return to_html(_document(results, plots))


# --- Pareto front ------------------------------------------------------------------------------


def pareto_front(
    points: list[tuple[str, float, float]], *, minimize_x: bool = True, minimize_y: bool = True
) -> list[str]:
    """Names of the points that no other point dominates.

    A point dominates another when it is at least as good on both coordinates and strictly
    better on one. Tied points (equal on both) do not dominate each other, so all of them stay
    on the front. Points with a NaN or infinite coordinate are never on the front.

    Args:
        points: ``(name, x, y)`` triples.
        minimize_x: smaller x is better (else larger).
        minimize_y: smaller y is better (else larger).

    Returns:
        The names of the front, in the order of ``points``.
    """
    sx = 1.0 if minimize_x else -1.0
    sy = 1.0 if minimize_y else -1.0
    valid = [
        (name, sx * float(x), sy * float(y))
        for name, x, y in points
        if math.isfinite(x) and math.isfinite(y)
    ]

    def dominated(x: float, y: float) -> bool:
        return any(ox <= x and oy <= y and (ox < x or oy < y) for _, ox, oy in valid)

    return [name for name, x, y in valid if not dominated(x, y)]


# --- plots -------------------------------------------------------------------------------------


def _label(name: str) -> str:
    """A plot label: long names lose their middle, since the end often names the quant."""
    name = " ".join(str(name).split())
    if len(name) <= _LABEL_CHARS:
        return name
    tail = _LABEL_CHARS // 2
    return name[: _LABEL_CHARS - tail - 1] + "…" + name[-tail:]


def _no_data(ax: Any, message: str = "no data") -> None:
    ax.text(
        0.5,
        0.5,
        message,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=12,
        color="#666666",
    )
    ax.set_xticks([])
    ax.set_yticks([])


# Label positions tried in turn (offset in points, alignment): right of the point first.
_LABEL_SPOTS = (
    (5, 5, "left"),
    (5, -13, "left"),
    (-5, 5, "right"),
    (-5, -13, "right"),
    (5, 16, "left"),
    (5, -24, "left"),
)


def annotate(ax: Any, points: list[tuple[str, float, float]], suffix: dict | None = None) -> None:
    """Label points, each at the first spot that stays in the axes and clear of the others."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()  # settles the layout and limits, so extents below are final
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = []
    for _, x, y in points:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_bounds(px - 4, py - 4, 8, 8))
    for name, x, y in sorted(points, key=lambda p: (p[1], p[2], p[0])):
        text = _label(name) + (suffix or {}).get(name, "")
        for i, (dx, dy, ha) in enumerate(_LABEL_SPOTS):
            label = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, fontsize=8
            )
            box = label.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0
            fits = fits and box.y1 <= inside.y1 and not any(box.overlaps(t) for t in taken)
            if fits or i == len(_LABEL_SPOTS) - 1:
                break
            label.remove()
        if not fits:  # nowhere is clear: the first spot, overlapping
            label.remove()
            dx, dy, ha = _LABEL_SPOTS[0]
            label = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, fontsize=8
            )
        taken.append(label.get_window_extent(renderer))


def _scatter_front(ax: Any, points: list, front: list[str], y_of: dict | None = None) -> None:
    """All points, with the front drawn larger and connected in order of x."""
    y_of = y_of or {}
    xs = [p[1] for p in points]
    ys = [y_of.get(p[0], p[2]) for p in points]
    ax.scatter(xs, ys, s=30, color="#4a78b5", label="artifact", zorder=3)
    on_front = sorted((p for p in points if p[0] in front), key=lambda p: (p[1], p[2]))
    if on_front:
        ax.plot(
            [p[1] for p in on_front],
            [y_of.get(p[0], p[2]) for p in on_front],
            color="#c0392b",
            linestyle="--",
            linewidth=1.2,
            marker="o",
            markersize=8,
            markerfacecolor="none",
            markeredgewidth=1.6,
            label="Pareto front",
            zorder=4,
        )
    sizes = [x for x in xs if x > 0]
    if len(sizes) >= 2 and max(sizes) / min(sizes) >= 20:  # sizes spanning decades
        ax.set_xscale("log")


def _plot_decode(ax: Any, results: dict) -> bool:
    speed, _, d0, _ = _front_points(results)
    ax.set_title(f"Decode speed against file size (depth {d0})")
    if not speed:
        return False
    _scatter_front(ax, speed, pareto_front(speed, minimize_x=True, minimize_y=False))
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(f"decode tok/s (median, depth {d0})")
    ax.margins(x=0.12, y=0.12)
    ax.set_ylim(bottom=0)
    annotate(ax, speed)
    ax.legend(loc="best", fontsize=8)
    return True


def _plot_kl(ax: Any, results: dict) -> bool:
    _, kl, _, ref = _front_points(results)
    ax.set_title(f"Mean KL vs {_label(ref or MISSING)} against file size")
    if not kl:
        return False
    front = pareto_front(kl, minimize_x=True, minimize_y=True)
    positive = [p[2] for p in kl if p[2] > 0]
    # A log axis only where the values span at least a decade; it cannot show 0 (the reference
    # against itself), so those points are drawn at a floor a decade below the smallest value.
    log = len(positive) >= 2 and max(positive) / min(positive) >= 10
    y_of, suffix = {}, {}
    if log:
        floor = min(positive) / 10
        y_of = {p[0]: floor for p in kl if p[2] <= 0}
        suffix = {name: " (KL 0)" for name in y_of}
        ax.set_yscale("log")
    _scatter_front(ax, kl, front, y_of)
    if y_of:
        ax.scatter(
            [p[1] for p in kl if p[0] in y_of],
            list(y_of.values()),
            marker="v",
            s=45,
            color="#7f8c8d",
            label="KL 0, drawn at the floor",
            zorder=5,
        )
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL (nats" + (", log scale)" if log else ")"))
    ax.margins(x=0.12, y=0.12)
    annotate(ax, [(n, x, y_of.get(n, y)) for n, x, y in kl], suffix)
    ax.legend(loc="best", fontsize=8)
    return True


def _barh(
    ax: Any,
    names: list[str],
    values: list[float],
    errors: list | None = None,
    fmt: Callable[[float], str] = str,
) -> None:
    positions = list(range(len(names)))
    ax.barh(
        positions,
        values,
        color="#4a78b5",
        height=0.6,
        xerr=None if errors is None else list(zip(*errors, strict=True)) or None,
        capsize=3,
    )
    ax.set_yticks(positions, [_label(n) for n in names], fontsize=8)
    ax.invert_yaxis()  # first artifact at the top, as in the tables
    top = max(values + [0.0])
    for pos, value, err in zip(positions, values, errors or [(0, 0)] * len(values), strict=True):
        ax.text(value + err[1] + top * 0.01, pos, fmt(value), va="center", fontsize=8)
    ax.set_xlim(0, top * 1.18 if top > 0 else 1)


def _plot_ttft(ax: Any, results: dict) -> bool:
    prompt = _get(results, "settings", "prompt_tokens")
    ax.set_title("Time to first token" + (f" ({prompt}-token prompt)" if prompt else ""))
    names, values, errors = [], [], []
    for a in _artifacts(results):
        stat = _get(a, "latency", "ttft_ms")
        median = _finite(_median(stat))
        if not _ok(a) or median is None:
            continue
        low = _finite(_get(stat, "min"))
        high = _finite(_get(stat, "max"))
        names.append(_name(a))
        values.append(median)
        errors.append(
            (
                max(median - low, 0.0) if low is not None else 0.0,
                max(high - median, 0.0) if high is not None else 0.0,
            )
        )
    if not names:
        return False
    _barh(ax, names, values, errors, fmt=lambda v: f"{v:.1f} ms")
    ax.set_xlabel("TTFT (ms, median; whiskers: min to max)")
    return True


def _plot_accuracy(ax: Any, results: dict) -> bool:
    refs = _references(results)
    ref = refs[0] if refs else None
    ok = [a for a in _artifacts(results) if _ok(a)]
    use_task = any(_finite(_task_accuracy(a)) is not None for a in ok)
    if use_task:
        figure = _task_accuracy
        questions = _get(results, "settings", "task", "questions")
        ax.set_title("Task accuracy" + (f" ({questions} questions)" if questions else ""))
        ax.set_xlabel("task accuracy (%)")
    else:

        def figure(a: dict) -> float | None:
            return _vs(a, ref, "top1_agreement")

        ax.set_title(f"Top-1 agreement with {_label(ref or MISSING)}")
        ax.set_xlabel("top-1 agreement (%)")
    pairs = [(_name(a), _finite(figure(a))) for a in ok]
    pairs = [(n, v * 100) for n, v in pairs if v is not None]
    if not pairs:
        return False
    _barh(ax, [n for n, _ in pairs], [v for _, v in pairs], fmt=lambda v: f"{v:.1f}%")
    ax.set_xlim(0, 112)
    return True


_DRAW = {
    "decode_vs_size": _plot_decode,
    "kl_vs_size": _plot_kl,
    "ttft": _plot_ttft,
    "accuracy": _plot_accuracy,
}


def plot_files(results: dict, out_dir: Path) -> dict[str, Path]:
    """Draw the four report plots as PNG files in ``out_dir``.

    Failed artifacts and artifacts without the figure are left out of a plot; a plot with
    nothing to show says "no data". The PNGs carry no timestamp or version metadata, so the
    same results give the same bytes.

    Args:
        results: a results object (see ``edgeft.bench.schema``).
        out_dir: the folder to write ``<name>.png`` into (created if missing).

    Returns:
        Plot name -> PNG path, in the order of ``PLOTS``.
    """
    # Imported here: matplotlib takes a while to load and only the report needs it. The Agg
    # canvas is used directly (no pyplot), so the process's backend and figure registry are
    # left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in PLOTS:
        fig = Figure(figsize=(7.5, 4.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if not _DRAW[name](ax, results):
            _no_data(ax)
        else:
            ax.grid(True, alpha=0.3, linewidth=0.6)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
        paths[name] = out_dir / f"{name}.png"
        write_bytes(paths[name], buffer.getvalue())
    return paths


# --- writing -----------------------------------------------------------------------------------


def write_reports(results: dict, out: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into ``out``.

    Each file is written through a temporary file and a rename.

    Args:
        results: a results object (see ``edgeft.bench.schema``).
        out: the folder to write into (created if missing).

    Returns:
        ``{"markdown": ..., "html": ..., <plot name>: ...}``.

    Raises:
        EdgeftError: ``results`` is not a results object of this schema.
    """
    validate(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_files(results, out / "plots")
    paths = {"markdown": out / "report.md", "html": out / "report.html"}
    write_text(paths["markdown"], render_markdown(results, plots=plots))
    write_text(paths["html"], render_html(results, plots))
    return {**paths, **plots}


# --- comparison --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Figure:
    label: str
    read: Callable[[dict], float | None]
    higher_is_better: bool
    threshold: float  # how much worse is flagged
    absolute: bool  # threshold in the figure's units (else a fraction of the old value)
    fmt: Callable[[Any], str]


def _compare_figures(d0: int, ref: str | None) -> list[_Figure]:
    def latency(key: str) -> Callable[[dict], float | None]:
        return lambda a: _median(_get(a, "latency", key))

    return [
        _Figure("size MB", _size_mb, False, SPEED_WORSE, False, _fixed),
        _Figure(
            f"decode tok/s @{d0}", lambda a: _decode_tok_s(a, d0), True, SPEED_WORSE, False, _fixed
        ),
        _Figure("TTFT ms", latency("ttft_ms"), False, SPEED_WORSE, False, _fixed),
        _Figure("prefill tok/s", latency("prefill_tok_s"), True, SPEED_WORSE, False, _fixed),
        _Figure(
            "peak RSS MB",
            lambda a: _num(_get(a, "latency", "peak_rss_mb")),
            False,
            SPEED_WORSE,
            False,
            _fixed,
        ),
        _Figure(
            f"mean KL vs {ref or MISSING}",
            lambda a: _vs(a, ref, "mean_kl"),
            False,
            KL_WORSE,
            True,
            _kl,
        ),
        _Figure(
            "perplexity",
            lambda a: _num(_get(a, "accuracy", "perplexity")),
            False,
            PERPLEXITY_WORSE,
            False,
            lambda v: _fixed(v, 2),
        ),
        _Figure("task accuracy", _task_accuracy, True, TASK_WORSE, True, _pct),
    ]


def _change(fig: _Figure, old: float | None, new: float | None) -> tuple[str, bool]:
    """The relative change as text, and whether it is worse beyond the figure's threshold."""
    if old is None or new is None or not (math.isfinite(old) and math.isfinite(new)):
        return MISSING, False
    rel = 0.0 if new == old else (new - old) / abs(old) * 100 if old != 0 else None
    text = MISSING if rel is None else f"{rel:+.1f}%"
    worse_by = (old - new) if fig.higher_is_better else (new - old)
    if fig.absolute:
        # Absolute figures also show the step itself: points for a share, nats for KL.
        step = f"{(new - old) * 100:+.1f} points" if fig.fmt is _pct else f"{new - old:+.4g} nats"
        text = f"{text} ({step})"
        return text, worse_by > fig.threshold
    return text, old != 0 and worse_by / abs(old) > fig.threshold


def _diff_keys(old: Any, new: Any, keys: list[str] | None = None) -> list[str]:
    old = old if isinstance(old, dict) else {}
    new = new if isinstance(new, dict) else {}
    keys = keys or list(dict.fromkeys([*old, *new]))
    return [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _run_notes(old: dict, new: dict) -> list[str]:
    notes = []
    # Measured bandwidth moves between runs on the same host, so it does not make a machine
    # different.
    machine = _diff_keys(
        old.get("machine"), new.get("machine"), ["cpu", "cores", "system", "ram_gb"]
    )
    if machine:
        notes.append(
            "Different machine (" + "; ".join(machine) + "): speed and memory "
            "figures are not like for like."
        )
    settings = _diff_keys(old.get("settings"), new.get("settings"))
    if settings:
        notes.append(
            "Different settings (" + "; ".join(settings) + "): figures measured "
            "differently are not like for like."
        )
    if _get(old, "device", "name") != _get(new, "device", "name"):
        notes.append(
            f"Different device profile: {_get(old, 'device', 'name') or 'none'} → "
            f"{_get(new, 'device', 'name') or 'none'}."
        )
    versions = _diff_keys(old.get("versions"), new.get("versions"))
    if versions:
        notes.append("Different versions: " + "; ".join(versions) + ".")
    old_refs, new_refs = _references(old), _references(new)
    if old_refs[:1] != new_refs[:1]:
        notes.append(
            f"Different first reference ({(old_refs or [MISSING])[0]} → "
            f"{(new_refs or [MISSING])[0]}): mean KL is read against "
            f"{(new_refs or [MISSING])[0]} in both runs where it exists."
        )
    return notes


def render_comparison(old: dict, new: dict) -> str:
    """Render the change between two results objects as markdown.

    Artifacts are matched by name. For each, the main figures are shown old, new and as a
    relative change, marked when worse beyond a threshold: 5% for speed and memory
    (``SPEED_WORSE``), ``KL_WORSE`` nats for mean KL, ``TASK_WORSE`` for task accuracy and
    ``PERPLEXITY_WORSE`` relative for perplexity. Mean KL is read against the new run's first
    reference. Different files (sha256), machines, settings and versions are noted.

    Args:
        old: the earlier results object.
        new: the later results object.

    Returns:
        The markdown text.

    Raises:
        EdgeftError: either object is not a results object of this schema.
    """
    validate(old, "old results")
    validate(new, "new results")
    refs = _references(new) or _references(old)
    ref = refs[0] if refs else None
    d0 = _first_depth(new)
    figures = _compare_figures(d0, ref)
    old_by_name = {}
    for a in _artifacts(old):
        old_by_name.setdefault(_name(a), a)
    new_by_name = {}
    for a in _artifacts(new):
        new_by_name.setdefault(_name(a), a)

    notes = _run_notes(old, new)
    worse: list[str] = []
    sections: list[_Block] = []
    for name, b in new_by_name.items():
        a = old_by_name.get(name)
        if a is None:
            continue
        remarks = []
        if a.get("sha256") != b.get("sha256"):
            remarks.append("a different file (sha256 changed)")
        if _ok(a) and not _ok(b):
            remarks.append(f"failed in the new run: {_first_line(b.get('error') or '')}")
            worse.append(f"{name}: failed in the new run")
        elif not _ok(a) and _ok(b):
            remarks.append("failed in the old run, works in the new one")
        elif not _ok(a):
            remarks.append("failed in both runs")
        sections.append(("h2", name))
        if remarks:
            text = "; ".join(remarks)
            sections.append(("p", text[0].upper() + text[1:] + "."))
        if not (_ok(a) or _ok(b)):
            continue
        table = Table(["figure", "old", "new", "change", "note"], "lrrrl")
        for fig in figures:
            old_v = fig.read(a) if _ok(a) else None
            new_v = fig.read(b) if _ok(b) else None
            text, is_worse = _change(fig, old_v, new_v)
            table.rows.append(
                [fig.label, fig.fmt(old_v), fig.fmt(new_v), text, WORSE if is_worse else ""]
            )
            table.failed.append(False)
            if is_worse:
                worse.append(f"{name}: {fig.label} {fig.fmt(old_v)} → {fig.fmt(new_v)}: {text}")
        sections.append(("table", table))

    added = [n for n in new_by_name if n not in old_by_name]
    removed = [n for n in old_by_name if n not in new_by_name]
    blocks: list[_Block] = [
        ("h1", "edgeft bench comparison"),
        (
            "kv",
            [
                ("Old", f"{old.get('created') or MISSING} (edgeft {old.get('edgeft_version')})"),
                ("New", f"{new.get('created') or MISSING} (edgeft {new.get('edgeft_version')})"),
            ],
        ),
    ]
    if notes:
        blocks += [("h2", "Notes"), ("ul", notes)]
    blocks += [
        ("h2", "Worse beyond the thresholds"),
        ("ul", worse) if worse else ("p", "Nothing got worse beyond the thresholds."),
    ]
    blocks += sections
    if added or removed:
        blocks += [
            ("h2", "Added and removed"),
            (
                "kv",
                [
                    ("Added (only in the new run)", ", ".join(added) or "none"),
                    ("Removed (only in the old run)", ", ".join(removed) or "none"),
                ],
            ),
        ]
    blocks += [
        (
            "p",
            f"Worse means: speed and memory figures worse by more than "
            f"{SPEED_WORSE:.0%}, mean KL up by more than {KL_WORSE} nats, task accuracy "
            f"down by more than {TASK_WORSE * 100:.0f} points, perplexity up by more "
            f"than {PERPLEXITY_WORSE:.0%}.",
        )
    ]
    return to_markdown(blocks)
