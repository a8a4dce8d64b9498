"""Run `edgeft demo` and commit its figures: benchmarks/results/demo.{md,html,json}, the
benchmarks of every model (demo-bench.{md,json,html}, demo-bench-incontext.json) and the plot;
the README's results table is rewritten from them.

Usage: python benchmarks/demo.py [--out DIR] [--no-readme]

The reports name the machine they ran on; the wall time of the whole demo is added.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from edgeft.demo import (
    BASE,
    BASE_Q8,
    TUNED,
    comparison_table,
    demo,
    load_demo,
    retention,
    write_report,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"


def readme_section(result, wall: float, machine: str) -> str:
    base, tuned = result.row(BASE), result.row(TUNED)
    incontext = next(iter(result.incontext_labels.values()))
    long, short = (result.row(x)["accuracy"]["task"]["prompt_tokens"] for x in (incontext, TUNED))
    kept = retention(base, tuned)
    floor = retention(base, result.row(BASE_Q8))
    cooking = base["accuracy"]["task"]
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
            f"Fine-tuning took cooking test accuracy from {result.accuracy(BASE):.1%} (base) to "
            f"{result.accuracy(TUNED):.1%} ({cooking['total']} questions worded differently "
            "from the training data, never used for a choice); the base model with "
            f"{result.shots} worked examples in its prompt reached "
            + " and ".join(
                f"{result.accuracy(label):.1%} ({result.row(label)['runtime']})"
                for label in result.incontext_labels.values()
            )
            + f", with a {long}-token median prompt against the fine-tuned model's {short}. "
            "Fine-tuning kept "
            + (f"{kept[0]} of the {kept[1]}" if kept else "-")
            + " general questions the base model answers"
            + (
                f" (the base model's own Q8_0 file keeps {floor[0]}: greedy answers flip on "
                "small numeric changes)"
                if floor
                else ""
            )
            + ". Mean KL is against the QLoRA "
            "fine-tuned model in PyTorch fp32 on a cooking text; TTFT on the median cooking "
            "prompt; decode speed from an empty context, 2 threads.",
            END,
        ]
    )


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2600) -> bool:
    """A headless Chromium screenshot of ``page`` (False where no Chromium is installed:
    ``apt-get install chromium``)."""
    browser = next(
        (
            shutil.which(b)
            for b in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(b)
        ),
        None,
    )
    if browser is None:
        print("no chromium: the report page was not screenshotted")
        return False
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    return png.is_file()


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
        text = README.read_text()
        section = readme_section(result, wall, record["machine"])
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{README}: no {START} ... {END} section to rewrite")
        README.write_text(pattern.sub(lambda _: section, text))
    print(report)


if __name__ == "__main__":
    main()
