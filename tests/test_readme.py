"""The READMEs' results tables and quoted figures are what the committed results files give
(benchmarks/readme_tables.py renders them; nothing here runs a model)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import readme_tables

ROOT = Path(__file__).resolve().parents[1]

HINT = "run `python benchmarks/readme_tables.py` after a new results file, not an edit by hand"


def test_every_marked_section_is_its_rendering():
    stale = readme_tables.stale_sections()
    assert not stale, f"differ from benchmarks/results/: {stale}; {HINT}"


def test_every_quoted_figure_is_its_results_file_s():
    stale = readme_tables.stale_figures()
    assert not stale, "\n".join(stale)


@pytest.mark.parametrize("section", readme_tables.SECTIONS, ids=lambda s: s.name)
def test_each_section_names_the_committed_results_files_it_comes_from(section):
    block = readme_tables.render(section)
    for source in section.sources:
        assert f"results/{source})" in block, f"{section.name} does not link {source}"
        assert (readme_tables.RESULTS / source).is_file()
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", *section.sources],
            cwd=readme_tables.RESULTS,
            capture_output=True,
            text=True,
        )
        assert tracked.returncode == 0, f"not committed: {tracked.stderr}"


def test_every_marker_in_the_docs_has_a_section():
    """A marked block with no renderer would never be checked."""
    names = {(s.doc, s.name) for s in readme_tables.SECTIONS}
    for doc in (readme_tables.README, readme_tables.BENCH_README):
        text = doc.read_text(encoding="utf-8")
        for name in re.findall(r"<!-- ([\w-]+):start -->", text):
            assert (doc, name) in names, f"{doc.name}: {name} has no renderer"


def test_an_edited_table_is_named_and_rewritten_back():
    doc = readme_tables.README
    text = doc.read_text(encoding="utf-8")
    demo = next(s for s in readme_tables.SECTIONS if s.doc == doc and s.name == "demo-results")
    row = next(
        line
        for line in readme_tables.current(text, demo.name).splitlines()
        if line.startswith(f"| {readme_tables.TUNED} |")
    )
    cells = row.split(" | ")
    cells[2] = "1" + cells[2]  # its cooking accuracy, "79.1% (53/67)" → "179.1% (53/67)"
    edited = text.replace(row, " | ".join(cells), 1)

    stale = readme_tables.stale_sections((demo,), {doc: edited})
    assert stale == ["README.md: demo-results"]
    restored, changed = readme_tables.rewrite(edited, (demo,))
    assert changed == ["README.md: demo-results"] and restored == text


def test_an_edited_quoted_figure_is_named():
    doc = readme_tables.README
    text = doc.read_text(encoding="utf-8")
    passage = readme_tables.f_demo_ttft()  # "ten times shorter, a TTFT of 143 ms instead ..."
    ms = re.search(r"(\d+) ms", passage)
    wrong = passage.replace(ms.group(), f"{int(ms.group(1)) + 1} ms", 1)
    edited = " ".join(text.split()).replace(passage, wrong)
    assert edited != " ".join(text.split())

    stale = readme_tables.stale_figures(readme_tables.FIGURES, {doc: edited})
    assert len(stale) == 1 and passage in stale[0] and "results/demo.json" in stale[0]


def test_a_section_without_markers_is_refused():
    section = readme_tables.SECTIONS[1]
    with pytest.raises(ValueError, match=f"no <!-- {section.name}:start -->"):
        readme_tables.rewrite("no markers here\n", (section,))


def test_check_exits_non_zero_naming_each_stale_section(monkeypatch, capsys):
    monkeypatch.setattr(readme_tables, "stale_sections", lambda: ["README.md: gguf-export"])
    assert readme_tables.main(["--check"]) == 1
    assert "README.md: gguf-export" in capsys.readouterr().out
    monkeypatch.setattr(readme_tables, "stale_sections", lambda: [])
    assert readme_tables.main(["--check"]) == 0
