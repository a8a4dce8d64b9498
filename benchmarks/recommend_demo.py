"""``edgeft recommend`` on the demo's fine-tuned model for a Raspberry Pi 5.

    python benchmarks/recommend_demo.py [--demo edgeft-demo] [--out DIR]

Runs ``edgeft recommend --model edgeft-demo/merged --device raspberry-pi-5 --task
cooking/dev.jsonl --report-task cooking-test.jsonl`` with the default candidates (GGUF Q8_0 to
Q2_K, Q4_K_M and Q4_0 also without importance matrix, ONNX int8 and int4): the pick is the
best cooking dev accuracy among the files that meet the profile's budgets; the test
questions are scored beside it and chose nothing. Writes results/recommend_demo.{md,json}:
the printed front, pick and verdicts, and every candidate's figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edgeft.demo import dataset_path
from edgeft.provenance import machine_summary

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", type=Path, default=Path("edgeft-demo"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgeft-recommend/pi5"))
    args = parser.parse_args()
    command = [
        "edgeft",
        "recommend",
        "--model",
        str(args.demo / "merged"),
        "--device",
        "raspberry-pi-5",
        "--task",
        str(dataset_path("dev.jsonl")),
        "--report-task",
        str(args.demo / "tasks" / "cooking-test.jsonl"),
        "--out",
        str(args.out),
        "--force",
    ]
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "edgeft.cli", *command[1:]], capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if run.returncode not in (0, 3):
        sys.exit(f"edgeft recommend failed ({run.returncode}):\n{run.stderr[-3000:]}")
    recommendation = json.loads((args.out / "recommendation.json").read_text())
    results = json.loads((args.out / "results.json").read_text())
    test = {}
    for row in results["artifacts"]:
        task = (row.get("accuracy") or {}).get("tasks", {}).get("cooking-test") or {}
        test[row["name"]] = task.get("accuracy")
    for entry in recommendation["candidates"]:
        entry["cooking_test_accuracy"] = test.get(entry["bench_row"])
    saved = {
        "machine": machine_summary(),
        "command": " ".join(command),
        "seconds": round(seconds, 1),
        "device": results["device"],
        "budgets": results["budgets"],
        "recommendation": recommendation,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recommend_demo.json").write_text(json.dumps(saved, indent=2) + "\n")
    lines = [
        "# `edgeft recommend` on the demo's model for a Raspberry Pi 5",
        "",
        f"Machine: {saved['machine']}; the Pi 5 emulated on it (threads, memory cap) and its "
        "decode speed predicted from the measured one × memory bandwidth "
        f"({results['device']['bandwidth_gbs']} GB/s). {seconds / 60:.1f} min, exports "
        "included. Command:",
        "",
        f"    {saved['command']}",
        "",
        "Chosen on the cooking dev questions; the test questions are scored beside them and "
        "chose nothing.",
        "",
        "| Candidate | Size | Decode (Pi 5, predicted) | TTFT | Peak RSS | Mean KL | Dev "
        "| Test | Front | Verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, pattern: str) -> str:
        return "—" if value is None else pattern.format(value)

    for c in recommendation["candidates"]:
        lines.append(
            f"| {c['name']} | {fmt(c['size_mb'], '{:.1f} MB')} | "
            f"{fmt(c['decode_tok_s'], '{:.1f} tok/s')} | {fmt(c['ttft_ms'], '{:.0f} ms')} | "
            f"{fmt(c['peak_rss_mb'], '{:.0f} MB')} | {fmt(c['mean_kl'], '{:.3f}')} | "
            f"{fmt(c['task_accuracy'], '{:.1%}')} | {fmt(c['cooking_test_accuracy'], '{:.1%}')} | "
            f"{'✓' if c['on_front'] else ''} | {c['verdict']} |"
        )
    pick = recommendation["pick"]
    lines += [
        "",
        f"Pick: **{pick['name']}**" if pick else "No candidate met the budgets.",
        "",
        "Printed by `edgeft recommend`:",
        "",
        "```",
        run.stdout.rstrip(),
        "```",
    ]
    (RESULTS / "recommend_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
