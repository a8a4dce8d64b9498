"""The bench harness's own overhead: its decode tok/s on a GGUF against a bare
llama-cpp-python eval loop on the same file, measured in the same run.

    python benchmarks/bench_overhead.py --gguf edgeft-demo/gguf/model-q4_k_m.gguf

Both sides decode the same number of greedy tokens from a one-token context, with the same
thread count, each in a fresh process; rounds alternate bare and harness so that a busy spell on
a shared machine hits both. The harness side is ``edgeft bench`` itself (its worker process, its
timing loop, the llama.cpp runtime). Writes ``results/bench_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from gguf_export import machine

HERE = Path(__file__).resolve().parent

# The bare loop: what a user would write with llama-cpp-python's own API, no edgeft import.
BARE = r"""
import json, sys, time
import numpy as np
import llama_cpp
path, threads, tokens, n_ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                      n_gpu_layers=0, verbose=False)
bos = llm.token_bos()
def run():
    llm.reset()
    llm.eval([bos])
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    return tokens / (time.perf_counter() - start)
run()  # warm-up
print(json.dumps([run() for _ in range(3)]))
"""


def bare(gguf: Path, threads: int, tokens: int) -> float:
    from edgeft.runtimes.llamacpp import MAX_DEFAULT_CTX, _trained_context_length

    # The same context size edgeft's llama.cpp runtime allocates, so only the loop differs.
    n_ctx = min(_trained_context_length(gguf), MAX_DEFAULT_CTX)
    out = subprocess.run(
        [sys.executable, "-c", BARE, str(gguf), str(threads), str(tokens), str(n_ctx)],
        capture_output=True,
        text=True,
        check=True,
    )
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))


def harness(gguf: Path, threads: int, tokens: int, work: Path, i: int) -> float:
    from edgeft.bench import BenchSettings, bench

    settings = BenchSettings(
        threads=threads, prompt_tokens=16, decode_tokens=tokens, depths=(0,), repeats=3, warmup=1
    )
    results = bench(
        [str(gguf)],
        work / f"run-{i}",
        references=[],
        settings=settings,
        progress=False,
        log=lambda _: None,
    )
    (decode,) = results["artifacts"][0]["latency"]["decode"]
    return decode["tok_s"]["median"]


# How far from the bare loop's speed the harness may be, in either direction: a harness faster
# than the loop it wraps is the rounds' spread, not a gain, and says as little as a slower one.
TOLERANCE = 0.05


def verdict(ratio: float) -> str:
    """Whether harness / bare loop is within ``TOLERANCE`` of 1, both ways."""
    if abs(ratio - 1) <= TOLERANCE:
        return f"within ±{TOLERANCE:.0%} of the bare loop"
    side = "faster" if ratio > 1 else "slower"
    return (
        f"NOT within ±{TOLERANCE:.0%}: the harness measured {abs(ratio - 1):.0%} {side} than the "
        "bare loop"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=Path("edgeft-demo/gguf/model-q4_k_m.gguf"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"bare llama-cpp-python loop": [], "edgeft bench": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            runs["bare llama-cpp-python loop"].append(bare(args.gguf, args.threads, args.tokens))
            runs["edgeft bench"].append(harness(args.gguf, args.threads, args.tokens, Path(tmp), i))
    medians = {name: statistics.median(values) for name, values in runs.items()}
    ratio = medians["edgeft bench"] / medians["bare llama-cpp-python loop"]
    results = {
        "machine": machine(),
        "gguf": str(args.gguf),
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": runs,
        "median_tok_s": medians,
        "ratio": ratio,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    lines = [
        "# Harness overhead: edgeft bench vs a bare llama-cpp-python loop",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}. File: the demo's "
        f"`{args.gguf.name}`; {args.threads} threads, "
        f"{args.tokens} greedy tokens from a one-token context; {args.rounds} rounds, each the "
        "median of 3 runs in a fresh process, rounds alternating. Reproduce: "
        "`python benchmarks/bench_overhead.py --gguf edgeft-demo/gguf/model-q4_k_m.gguf` "
        "(after `make demo`).",
        "",
        "| | decode tok/s (median of rounds) | rounds |",
        "|---|---:|---|",
    ]
    for name, values in runs.items():
        lines.append(f"| {name} | {medians[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    lines += ["", f"edgeft bench / bare loop: {ratio:.3f} ({verdict(ratio)})."]
    (args.out / "bench_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
