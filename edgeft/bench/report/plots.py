"""The report's plots: matplotlib figures drawn to PNG files, and point labels that keep
clear of each other (``annotate``, also used by ``edgeft demo``)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeft._io import write_bytes
from edgeft.bench.report.document import MISSING, PLOTS
from edgeft.bench.report.pareto import _front_points, pareto_front
from edgeft.bench.report.read import (
    _artifacts,
    _finite,
    _get,
    _median,
    _name,
    _ok,
    _references,
    _task_accuracy,
    _vs,
)

_LABEL_CHARS = 28  # point and bar labels in plots are cut here


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
