"""Bench reports (markdown, HTML, plots, comparisons) built from the schema's example results."""

from __future__ import annotations

import base64
import copy
import math
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from edgeft.bench.report import (
    PLOTS,
    pareto_front,
    plot_files,
    render_comparison,
    render_html,
    render_markdown,
    write_reports,
)
from edgeft.bench.report.browser import find_chromium, load_page
from edgeft.bench.schema import example_results
from edgeft.errors import EdgeftError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_COLUMNS = ("size MB", "TTFT ms", "decode tok/s @0", "peak RSS MB", "mean KL vs merged")


def _artifact(results: dict, name: str) -> dict:
    return next(a for a in results["artifacts"] if a["name"] == name)


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _main_rows(markdown: str) -> list[dict[str, str]]:
    """The main table's rows as {header: cell}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| artifact | runtime"))
    header = _cells(lines[start])
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _row(markdown: str, name: str) -> dict[str, str]:
    (row,) = [r for r in _main_rows(markdown) if r["artifact"] == name]
    return row


def _section(markdown: str, title: str) -> str:
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


class _StrictHTML(HTMLParser):
    """Records tags and flags unbalanced tags and external resources."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: Counter[str] = Counter()
        self.images: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            if key in attrs and not str(attrs[key]).startswith("data:"):
                self.errors.append(f"external {key}={attrs[key]!r}")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with {self.stack[-3:]} open")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


class _TableRows(HTMLParser):
    """The cell texts of every table row, header rows included."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _parse(text: str) -> _StrictHTML:
    parser = _StrictHTML()
    parser.feed(text)
    parser.close()
    assert parser.errors == []
    assert parser.stack == []
    return parser


def _assert_pngs(paths: dict[str, Path]) -> None:
    assert list(paths) == list(PLOTS)
    for path in paths.values():
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE), path
        assert 5_000 < len(data) < 300_000, (path, len(data))


# --- write_reports and plots --------------------------------------------------------------------


def test_write_reports_writes_markdown_html_and_four_pngs(tmp_path):
    out = tmp_path / "report"
    paths = write_reports(example_results(), out)
    assert paths["markdown"] == out / "report.md"
    assert paths["html"] == out / "report.html"
    assert paths["markdown"].read_text(encoding="utf-8").startswith("# edgeft bench report")
    assert paths["html"].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    _assert_pngs({name: paths[name] for name in PLOTS})
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(
        f"{name}.png" for name in PLOTS
    )
    # atomic writes leave no temporary files behind
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "![Decode speed against file size](plots/decode_vs_size.png)" in markdown


def test_plots_are_byte_identical_and_carry_no_metadata(tmp_path):
    first = plot_files(example_results(), tmp_path / "a")
    second = plot_files(example_results(), tmp_path / "b")
    for name in PLOTS:
        data = first[name].read_bytes()
        assert data == second[name].read_bytes(), name
        assert b"tEXt" not in data and b"Matplotlib" not in data


def test_write_reports_rejects_other_schemas(tmp_path):
    with pytest.raises(EdgeftError, match="schema"):
        write_reports({"schema": "something/9"}, tmp_path / "out")


# --- HTML ---------------------------------------------------------------------------------------


def test_html_is_well_formed_self_contained_and_embeds_the_plots(tmp_path):
    results = example_results()
    paths = write_reports(results, tmp_path / "out")
    page = _parse(paths["html"].read_text(encoding="utf-8"))
    assert page.tags["script"] == 0 and page.tags["link"] == 0
    assert page.tags["table"] == 1
    assert len(page.images) == len(PLOTS)
    for image in page.images:
        assert image["alt"]
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix)
        assert base64.b64decode(image["src"][len(prefix) :]).startswith(PNG_SIGNATURE)
    text = "".join(page.text)
    for artifact in results["artifacts"]:
        assert artifact["name"] in text
    assert "broken.gguf: not a GGUF file" in text


def test_html_escapes_names_and_errors_from_users_files():
    results = example_results()
    _artifact(results, "int4")["name"] = "<script>x</script>.gguf"
    _artifact(results, "broken.gguf")["error"] = '<img src=x onerror="alert(1)"> bad file'
    page_html = render_html(results, {})
    assert "<script>" not in page_html and "<img" not in page_html
    assert "&lt;script&gt;x&lt;/script&gt;.gguf" in page_html
    page = _parse(page_html)
    assert page.tags["script"] == 0 and page.tags["img"] == 0
    text = "".join(page.text)
    assert "<script>x</script>.gguf" in text
    assert '<img src=x onerror="alert(1)"> bad file' in text
    # the markdown carries no raw HTML either
    assert "<script>" not in render_markdown(results)


def test_html_highlights_missed_budgets():
    page_html = render_html(example_results(), {})
    assert page_html.count('<td class="miss">') == 3  # two budget misses and one failure
    assert '<td class="miss">✗ min_decode_tok_s</td>' in page_html


def _near(pixels, colour: str, tolerance: int = 3) -> int:
    """How many pixels are within ``tolerance`` of ``colour`` (``#rrggbb``) on every channel."""
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(pixels - rgb).max(axis=2) <= tolerance).sum())


def test_report_html_in_headless_chromium_shows_the_table_plots_and_styles(tmp_path):
    if find_chromium() is None:
        pytest.skip("no Chromium on PATH (chromium, chromium-browser, google-chrome)")
    from PIL import Image  # installed with matplotlib

    results = example_results()
    paths = write_reports(results, tmp_path / "out")
    shot = tmp_path / "report.png"
    # tall enough for the whole page, the four plots included
    dom = load_page(paths["html"], screenshot=shot, width=1400, height=3600)

    # The DOM as the browser built it: one main table holding the markdown's rows cell for cell,
    # and one embedded PNG per plot written, in order, with its title.
    page = _parse(dom)
    assert page.tags["table"] == 1
    table = _TableRows()
    table.feed(dom)
    header, *rows = table.rows
    markdown_rows = _main_rows(paths["markdown"].read_text(encoding="utf-8"))
    assert [dict(zip(header, row, strict=True)) for row in rows] == markdown_rows
    assert [row[0] for row in rows] == [a["name"] for a in results["artifacts"]]
    q8 = dict(zip(header, rows[1], strict=True))
    assert (q8["artifact"], q8["size MB"], q8["decode tok/s @0"]) == (
        "model-q8_0.gguf",
        "145.0",
        "99.0",
    )
    plots = {name: paths[name] for name in PLOTS}
    assert [image["alt"] for image in page.images] == [PLOTS[name] for name in plots]
    for image, path in zip(page.images, plots.values(), strict=True):
        assert image["src"] == "data:image/png;base64," + base64.b64encode(
            path.read_bytes()
        ).decode("ascii")

    # The screenshot: the page drawn, with the template's CSS (the missed-budget cells' red)
    # and the plots' pixels (the bars' and points' blue, a colour the page's CSS never uses).
    assert shot.stat().st_size > 20_000
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape == (3600, 1400, 3)
    colours = pixels.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1])
    assert len(np.unique(colours)) > 100  # not one flat colour
    assert _near(pixels, "#fde4e2") > 1_000  # td.miss background
    assert _near(pixels, "#f3f3f3") > 10_000  # th background
    assert _near(pixels, "#4a78b5") > 20_000  # the plots' bars and points


# --- markdown -----------------------------------------------------------------------------------


def test_markdown_has_one_main_row_per_artifact():
    results = example_results()
    markdown = render_markdown(results)
    assert [r["artifact"] for r in _main_rows(markdown)] == [
        a["name"] for a in results["artifacts"]
    ]
    row = _row(markdown, "model-q8_0.gguf")
    assert row["size MB"] == "145.0"
    assert row["decode tok/s @0"] == "99.0"
    assert row["decode tok/s @512"] == "89.1"
    assert row["p50/p99 token ms @0"] == "10.1 / 13.1"
    assert row["mean KL vs merged"] == "0.008"
    assert row["top-1 vs merged"] == "96.6%"
    assert row["task accuracy"] == "48.0%"
    for heading in ("## Settings", "## Budgets", "## Pareto front", "## How to read this"):
        assert heading in markdown
    assert "heldout.jsonl (67 questions" in markdown
    assert "llama-cpp-python 0.3.36" in markdown


def test_failed_artifact_row_shows_its_error_and_dashes():
    row = _row(render_markdown(example_results()), "broken.gguf")
    assert row["budgets"] == "✗ failed: broken.gguf: not a GGUF file"
    for column in FIGURE_COLUMNS + ("perplexity", "task accuracy", "load s"):
        assert row[column] == "-", column


def test_budget_misses_are_marked_with_the_budget_name():
    markdown = render_markdown(example_results())
    assert _row(markdown, "merged")["budgets"] == "✗ min_decode_tok_s"
    assert _row(markdown, "model-q8_0.gguf")["budgets"] == "✗ min_decode_tok_s"
    assert _row(markdown, "int4")["budgets"] == "✓"
    budgets = _section(markdown, "Budgets")
    assert "decode speed ≥ 100.0 tok/s (min_decode_tok_s): missed by merged (35.0), " in budgets
    assert "model-q8_0.gguf (99.0)" in budgets
    assert "Every artifact met every budget: no." in budgets


def test_markdown_names_the_pareto_fronts():
    pareto = _section(render_markdown(example_results()), "Pareto front")
    assert "Small and fast (size vs decode tok/s @0): int4\n" in pareto
    assert "Small and accurate (size vs mean KL vs merged): merged, model-q8_0.gguf, int4" in pareto


def test_null_and_missing_figures_render_as_dashes():
    results = example_results()
    int4 = _artifact(results, "int4")
    int4["latency"]["ttft_ms"] = None
    int4["latency"]["prefill_tok_s"] = None
    del int4["latency"]["load_s"]
    int4["latency"]["decode"][0]["tok_s"] = None
    int4["latency"]["decode"][0]["token_ms"] = None
    int4["latency"]["peak_rss_mb"] = None
    int4["accuracy"] = {"perplexity": None, "vs": {}, "task": None}
    markdown = render_markdown(results)
    row = _row(markdown, "int4")
    for column in (
        "load s",
        "TTFT ms",
        "prefill tok/s",
        "decode tok/s @0",
        "p50/p99 token ms @0",
        "peak RSS MB",
        "perplexity",
        "mean KL vs merged",
        "top-1 vs merged",
        "task accuracy",
    ):
        assert row[column] == "-", column
    assert row["decode tok/s @512"] == "105.3"
    # a null decode speed is left out, not read as 0 (int4, the smallest, would then be on it)
    assert "Small and fast (size vs decode tok/s @0): model-q4_k_m.gguf\n" in markdown


def test_failed_artifact_figures_are_not_used():
    results = example_results()
    int4 = _artifact(results, "int4")
    int4.update(status="failed", error="crashed after timing")  # its figures stay in the file
    markdown = render_markdown(results)
    assert _row(markdown, "int4")["decode tok/s @0"] == "-"
    assert "Small and fast (size vs decode tok/s @0): model-q4_k_m.gguf\n" in markdown


def test_device_profile_and_predictions_are_shown():
    results = example_results()
    results["device"] = {
        "name": "pixel-8",
        "title": "Pixel 8 (Tensor G3)",
        "bandwidth_gbs": 12.5,
        "ram_gb": 8.0,
        "threads": 4,
        "applied": ["threads limited to 4"],
        "not_emulated": ["thermal throttling"],
    }
    _artifact(results, "int4")["latency"]["decode"][0]["predicted_tok_s"] = 42.04
    markdown = render_markdown(results)
    assert _row(markdown, "int4")["decode tok/s @0"] == "117.0 (42.0)"
    assert _row(markdown, "model-q4_k_m.gguf")["decode tok/s @0"] == "108.0"
    device = _section(markdown, "Device profile")
    assert "Pixel 8 (Tensor G3) (pixel-8)" in device
    assert "**Not emulated:** thermal throttling" in device
    assert "prediction for the device profile" in _section(markdown, "How to read this")
    assert "## Device profile" not in render_markdown(example_results())


def test_kl_is_printed_with_four_significant_digits_or_scientific():
    results = example_results()
    _artifact(results, "model-q8_0.gguf")["accuracy"]["vs"]["merged"]["mean_kl"] = 1.23456e-5
    _artifact(results, "int4")["accuracy"]["vs"]["merged"]["mean_kl"] = 0.123456
    markdown = render_markdown(results)
    assert _row(markdown, "model-q8_0.gguf")["mean KL vs merged"] == "1.235e-05"
    assert _row(markdown, "int4")["mean KL vs merged"] == "0.1235"
    assert _row(markdown, "merged")["mean KL vs merged"] == "0"


def test_other_references_get_their_own_table():
    results = example_results()
    results["references"].append(
        {"name": "base", "path": "/models/base", "runtime": "torch", "perplexity": 16.0}
    )
    _artifact(results, "int4")["accuracy"]["vs"]["base"] = {
        "mean_kl": 0.25,
        "top1_agreement": 0.8,
        "max_abs_diff": 2.0,
        "positions": 260,
    }
    markdown = render_markdown(results)
    assert "mean KL vs base" not in _main_rows(markdown)[0]
    other = _section(markdown, "Other references")
    assert "| int4 | 0.25 | 80.0% |" in other
    assert "| merged | - | - |" in other


def test_only_failed_artifacts_still_render_and_plot(tmp_path):
    results = example_results()
    results["artifacts"] = [_artifact(results, "broken.gguf")]
    paths = write_reports(results, tmp_path / "out")
    _assert_pngs({name: paths[name] for name in PLOTS})
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert [r["artifact"] for r in _main_rows(markdown)] == ["broken.gguf"]
    assert "Small and fast (size vs decode tok/s @0): no data" in markdown
    _parse(paths["html"].read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "change",
    [
        "single artifact",
        "all kl zero",
        "no task",
        "nan perplexity",
        "no references",
    ],
)
def test_unusual_results_render_and_plot(tmp_path, change):
    results = example_results()
    if change == "single artifact":
        results["artifacts"] = results["artifacts"][:1]
    elif change == "all kl zero":
        for artifact in results["artifacts"][:4]:
            artifact["accuracy"]["vs"]["merged"]["mean_kl"] = 0.0
    elif change == "no task":
        results["settings"]["task"] = None
        for artifact in results["artifacts"][:4]:
            artifact["accuracy"]["task"] = None
    elif change == "nan perplexity":
        _artifact(results, "int4")["accuracy"]["perplexity"] = math.nan
    elif change == "no references":
        results["references"] = []
        for artifact in results["artifacts"][:4]:
            artifact["accuracy"]["vs"] = {}
    paths = write_reports(results, tmp_path / "out")
    _assert_pngs({name: paths[name] for name in PLOTS})
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert len(_main_rows(markdown)) == len(results["artifacts"])


# --- Pareto front -------------------------------------------------------------------------------


def test_pareto_front_drops_dominated_points():
    points = [("a", 1.0, 1.0), ("b", 2.0, 2.0), ("c", 0.5, 3.0), ("d", 1.0, 3.0)]
    assert pareto_front(points) == ["a", "c"]


def test_pareto_front_small_and_fast():
    points = [
        ("small-slow", 1.0, 10.0),
        ("big-fast", 5.0, 50.0),
        ("big-slow", 5.0, 10.0),
        ("mid", 3.0, 30.0),
    ]
    assert pareto_front(points, minimize_y=False) == ["small-slow", "big-fast", "mid"]
    assert pareto_front(points, minimize_x=False, minimize_y=False) == ["big-fast"]


def test_pareto_front_keeps_ties():
    points = [("a", 1.0, 1.0), ("b", 1.0, 1.0), ("c", 1.0, 2.0), ("d", 2.0, 1.0)]
    assert pareto_front(points) == ["a", "b"]


def test_pareto_front_single_empty_and_nan():
    assert pareto_front([("only", 3.0, 4.0)]) == ["only"]
    assert pareto_front([]) == []
    assert pareto_front([("nan", math.nan, 0.0), ("a", 1.0, 1.0)]) == ["a"]


# --- comparison ---------------------------------------------------------------------------------


def _doctored() -> tuple[dict, dict]:
    old, new = example_results(), example_results()
    _artifact(old, "int4")["latency"]["decode"][0]["tok_s"]["median"] = 100.0
    _artifact(new, "int4")["latency"]["decode"][0]["tok_s"]["median"] = 90.0
    _artifact(old, "model-q4_k_m.gguf")["latency"]["decode"][0]["tok_s"]["median"] = 100.0
    _artifact(new, "model-q4_k_m.gguf")["latency"]["decode"][0]["tok_s"]["median"] = 96.0
    _artifact(new, "model-q4_k_m.gguf")["sha256"] = "1" * 64
    _artifact(new, "model-q8_0.gguf")["accuracy"]["task"]["accuracy"] = 0.40
    added = copy.deepcopy(_artifact(new, "int4"))
    added["name"] = "model-q5_k_m.gguf"
    new["artifacts"].append(added)
    new["artifacts"].remove(_artifact(new, "merged"))
    return old, new


def test_comparison_shows_relative_change_and_marks_regressions():
    old, new = _doctored()
    text = render_comparison(old, new)
    assert "| decode tok/s @0 | 100.0 | 90.0 | -10.0% | ⚠ worse |" in _section(text, "int4")
    # within the 5% noise band: shown, not marked
    q4 = _section(text, "model-q4_k_m.gguf")
    assert "| decode tok/s @0 | 100.0 | 96.0 | -4.0% |  |" in q4
    assert "A different file (sha256 changed)." in q4
    q8 = _section(text, "model-q8_0.gguf")
    assert "| task accuracy | 48.0% | 40.0% | -16.7% (-8.0 points) | ⚠ worse |" in q8
    worse = _section(text, "Worse beyond the thresholds")
    assert "int4: decode tok/s @0 100.0 → 90.0: -10.0%" in worse
    assert "model-q4_k_m.gguf: decode" not in worse


def test_comparison_lists_added_and_removed_artifacts():
    old, new = _doctored()
    text = render_comparison(old, new)
    assert "**Added (only in the new run):** model-q5_k_m.gguf" in text
    assert "**Removed (only in the old run):** merged" in text
    assert "\n## merged\n" not in text


def test_comparison_notes_different_machines_and_settings():
    old, new = example_results(), example_results()
    new["machine"]["cpu"] = "Apple M2"
    new["settings"]["threads"] = 4
    notes = _section(render_comparison(old, new), "Notes")
    assert "Different machine (cpu 'AMD EPYC' → 'Apple M2')" in notes
    assert "not like for like" in notes
    assert "threads 2 → 4" in notes


def test_comparison_of_identical_runs_flags_nothing():
    results = example_results()
    text = render_comparison(results, copy.deepcopy(results))
    assert "Nothing got worse beyond the thresholds." in text
    assert "## Notes" not in text and "⚠" not in text
    assert "Failed in both runs." in _section(text, "broken.gguf")


def test_comparison_rejects_other_schemas():
    with pytest.raises(EdgeftError, match="old results"):
        render_comparison({"schema": "x"}, example_results())
