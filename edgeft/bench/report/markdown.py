"""Blocks as markdown: ``report.md``, and the comparison of two runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from edgeft.bench.report.document import PLOTS, Table, _Block, _document


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
