"""Run `edgeft demo` and commit its figures: benchmarks/results/demo.{md,html,json}, the
benchmarks of every model (demo-bench.{md,json,html}, demo-bench-incontext.json) and the plot;
the READMEs' results sections are rewritten from them (benchmarks/readme_tables.py).

Usage: python benchmarks/demo.py [--out DIR] [--no-readme]

The reports name the machine they ran on; the wall time of the whole demo is added.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import readme_tables  # the READMEs' results sections, rendered from RESULTS

from edgeft.bench.report.browser import find_chromium, screenshot
from edgeft.demo import demo, load_demo, write_report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "edgeft-demo")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    parser.add_argument(
        "--rerender",
        action="store_true",
        help="do not run the demo: render the report of the finished one in --out again and "
        "publish it (the wall time is the committed run's)",
    )
    args = parser.parse_args()
    if args.rerender:
        result = load_demo(args.out)
        write_report(result)
        wall = json.loads((RESULTS / "demo.json").read_text())["wall_seconds"]
    else:
        start = time.perf_counter()
        result = demo(args.out, force=True)
        wall = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    record = json.loads((args.out / "demo.json").read_text())
    record["wall_seconds"] = round(wall, 1)
    (RESULTS / "demo.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    report = (args.out / "report.md").read_text()
    report = report.replace("](plots/", "](demo-plots/")
    report += f"\nWhole demo wall time: {wall / 60:.1f} min (`python benchmarks/demo.py`).\n"
    (RESULTS / "demo.md").write_text(report)
    shutil.copy(args.out / "report.html", RESULTS / "demo.html")
    if find_chromium() is None:
        print("no chromium: the report page was not screenshotted (apt-get install chromium)")
    else:
        screenshot(RESULTS / "demo.html", RESULTS / "demo-report.png")
    bench = args.out / "bench"
    shutil.copy(bench / "results.json", RESULTS / "demo-bench.json")
    shutil.copy(
        args.out / "bench-incontext" / "results.json", RESULTS / "demo-bench-incontext.json"
    )
    shutil.copy(bench / "report.html", RESULTS / "demo-bench.html")
    plots = RESULTS / "demo-plots"
    shutil.rmtree(plots, ignore_errors=True)
    shutil.copytree(bench / "plots", plots)
    shutil.copy(args.out / "plots" / "accuracy_vs_size.png", plots / "accuracy_vs_size.png")
    (RESULTS / "demo-bench.md").write_text(
        (bench / "report.md").read_text().replace("](plots/", "](demo-plots/")
    )
    if not args.no_readme:
        for section in readme_tables.write():
            print(f"rewrote {section}")
    print(report)


if __name__ == "__main__":
    main()
