"""Run `edgeft demo` and commit its figures: benchmarks/results/demo.{md,json}.

Usage: python benchmarks/demo.py [--out DIR]

The report names the machine it ran on; the wall time of the whole demo is added to the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from edgeft.demo import demo

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "edgeft-demo")
    args = parser.parse_args()
    start = time.perf_counter()
    demo(args.out, force=True)
    wall = time.perf_counter() - start
    RESULTS.mkdir(exist_ok=True)
    record = json.loads((args.out / "demo.json").read_text())
    record["wall_seconds"] = round(wall, 1)
    (RESULTS / "demo.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    report = (args.out / "report.md").read_text()
    report += f"\nWhole demo wall time: {wall / 60:.1f} min (`python benchmarks/demo.py`).\n"
    (RESULTS / "demo.md").write_text(report)
    shutil.rmtree(args.out, ignore_errors=True)
    print(report)


if __name__ == "__main__":
    main()
