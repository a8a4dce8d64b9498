"""Blocks as one self-contained HTML page (``report.html``), through ``templates/report.html.j2``.

The CSS lives in the template and each plot is embedded as a base64 ``data:`` URI, so the page
needs no other file. The template escapes every value (autoescape): artifact names and error
messages come from users' files.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from edgeft.bench.report.document import MISS, PASS, PLOTS, Table, _Block, _document

TEMPLATE = "report.html.j2"


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("edgeft.bench.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt field fails instead of printing nothing
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    return env.get_template(TEMPLATE)


def _cell_class(cell: str, align: str) -> str:
    return "miss" if cell.startswith(MISS) else "pass" if cell == PASS else align


def _table_view(table: Table) -> dict[str, Any]:
    rows = [
        {
            "failed": failed,
            "cells": [
                {"text": cell, "css": _cell_class(cell, align)}
                for cell, align in zip(row, table.align, strict=True)
            ],
        }
        for row, failed in zip(table.rows, table.failed, strict=True)
    ]
    return {"headers": table.headers, "rows": rows}


def _plots_view(plots: Mapping[str, Path]) -> list[dict[str, str]]:
    return [
        {
            "title": PLOTS.get(name, name),
            "src": "data:image/png;base64,"
            + base64.b64encode(Path(path).read_bytes()).decode("ascii"),
        }
        for name, path in plots.items()
    ]


def _view(blocks: list[_Block]) -> list[_Block]:
    """The blocks as the template reads them: tables with a CSS class per cell, plots as
    ``data:`` URIs with their titles."""
    view: list[_Block] = []
    for kind, payload in blocks:
        if kind == "table":
            payload = _table_view(payload)
        elif kind == "plots":
            payload = _plots_view(payload)
        view.append((kind, payload))
    return view


def to_html(blocks: list[_Block], title: str = "edgeft bench report") -> str:
    """Blocks as one self-contained HTML page (CSS in the page, plots embedded).

    Args:
        blocks: the document (see ``edgeft.bench.report.document``).
        title: the page's ``<title>``.

    Returns:
        The HTML text.

    Raises:
        FileNotFoundError: a plot path does not exist.
    """
    return _template().render(title=title, blocks=_view(blocks))


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
