"""Readable reports of ``edgeft bench``: ``report.md``, ``report.html`` and ``plots/*.png``.

Both reports are rendered from one list of blocks (headings, paragraphs, lists, tables, plots),
so the markdown and the HTML always carry the same content. Every figure is read defensively:
a ``null`` or missing value prints as ``-`` and is left out of the plots, never drawn as 0.

One module per job:

- ``read``: defensive readers of a results object;
- ``document``: the results as blocks, and the formats of the figures;
- ``pareto``: the Pareto front;
- ``markdown`` and ``html``: blocks as ``report.md`` and ``report.html`` (a jinja2 template);
- ``plots``: the PNG plots;
- ``compare``: the change between two runs;
- ``browser``: a page loaded in headless Chromium, for checks and screenshots.
"""

from __future__ import annotations

from pathlib import Path

from edgeft._io import write_text
from edgeft.bench.report.compare import (
    KL_WORSE,
    PERPLEXITY_WORSE,
    SPEED_WORSE,
    TASK_WORSE,
    render_comparison,
)
from edgeft.bench.report.document import BUDGETS, MISS, MISSING, PASS, PLOTS, WORSE, Table
from edgeft.bench.report.html import render_html, to_html
from edgeft.bench.report.markdown import render_markdown, to_markdown
from edgeft.bench.report.pareto import pareto_front
from edgeft.bench.report.plots import annotate, plot_files
from edgeft.bench.schema import validate

__all__ = [
    "BUDGETS",
    "KL_WORSE",
    "MISS",
    "MISSING",
    "PASS",
    "PERPLEXITY_WORSE",
    "PLOTS",
    "SPEED_WORSE",
    "TASK_WORSE",
    "WORSE",
    "Table",
    "annotate",
    "pareto_front",
    "plot_files",
    "render_comparison",
    "render_html",
    "render_markdown",
    "to_html",
    "to_markdown",
    "write_reports",
]


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
