"""Run `edgeft demo` and commit its figures: benchmarks/results/demo.{md,json} and the
benchmark of every model (demo-bench.{md,json,html}); the README's results table is rewritten
from them.

Usage: python benchmarks/demo.py [--out DIR] [--no-readme]

The reports name the machine they ran on; the wall time of the whole demo is added.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from edgeft.demo import comparison_table, demo

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"


def readme_section(result, wall: float, machine: str) -> str:
    base, tuned = result.base_task, result.tuned_task
    return "\n".join(
        [
            START,
            f"`edgeft demo` on {machine}, from [benchmarks/results/demo.md]"
            "(benchmarks/results/demo.md) (whole run: "
            f"{wall / 60:.1f} min; every figure in "
            "[demo-bench.md](benchmarks/results/demo-bench.md)):",
            "",
            *comparison_table(result),
            "",
            f"Fine-tuning took held-out accuracy from {base.accuracy:.1%} to "
            f"{tuned.accuracy:.1%} ({base.total} questions worded differently from the training "
            "data). KL and perplexity are against the fine-tuned model in PyTorch fp32 on a "
            "cooking text; decode speed from an empty context, 2 threads.",
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "edgeft-demo")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    args = parser.parse_args()
    start = time.perf_counter()
    result = demo(args.out, force=True)
    wall = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    record = json.loads((args.out / "demo.json").read_text())
    record["wall_seconds"] = round(wall, 1)
    (RESULTS / "demo.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    report = (args.out / "report.md").read_text()
    report = report.replace("`bench/report.html`", "[demo-bench.html](demo-bench.html)")
    report = report.replace("`bench/report.md`", "[demo-bench.md](demo-bench.md)")
    report = report.replace("`bench/results.json`", "[demo-bench.json](demo-bench.json)")
    report += f"\nWhole demo wall time: {wall / 60:.1f} min (`python benchmarks/demo.py`).\n"
    (RESULTS / "demo.md").write_text(report)
    bench = args.out / "bench"
    shutil.copy(bench / "results.json", RESULTS / "demo-bench.json")
    shutil.copy(bench / "report.html", RESULTS / "demo-bench.html")
    plots = RESULTS / "demo-plots"
    shutil.rmtree(plots, ignore_errors=True)
    shutil.copytree(bench / "plots", plots)
    (RESULTS / "demo-bench.md").write_text(
        (bench / "report.md").read_text().replace("](plots/", "](demo-plots/")
    )
    if not args.no_readme:
        text = README.read_text()
        section = readme_section(result, wall, record["machine"])
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{README}: no {START} ... {END} section to rewrite")
        README.write_text(pattern.sub(lambda _: section, text))
    print(report)


if __name__ == "__main__":
    main()
