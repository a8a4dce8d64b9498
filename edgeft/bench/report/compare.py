"""The change between two bench runs, as markdown (``edgeft bench --compare``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgeft.bench.report.document import (
    MISSING,
    WORSE,
    Table,
    _Block,
    _first_line,
    _fixed,
    _kl,
    _pct,
)
from edgeft.bench.report.markdown import to_markdown
from edgeft.bench.report.read import (
    _artifacts,
    _decode_tok_s,
    _first_depth,
    _get,
    _median,
    _name,
    _num,
    _ok,
    _references,
    _size_mb,
    _task_accuracy,
    _vs,
)
from edgeft.bench.schema import validate

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
