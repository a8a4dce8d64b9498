"""One artifact, measured in its own process: ``python -m edgeft.bench.worker SPEC RESULT``.

The harness writes SPEC (JSON) and reads RESULT (JSON); running each artifact in a fresh
process makes its peak RSS its own, and lets the same runner work on a remote device. SPEC::

    {"artifact": path, "runtime": name, "threads": int,
     "emulation": Emulation fields or null,            # edgeft.devices.emulate
     "latency": {"prompt_tokens", "decode_tokens", "depths", "repeats", "warmup"} or null,
     "accuracy": {"eval_ids": [int] or null, "eval_text": str, "max_eval_tokens": int,
                  "references": [{"name", "logits"}],  # .npy files of [n, vocab] float32
                  "task": [{"question", "answers", "context"?}] or null,
                  "tasks": {name: [rows like "task"]},  # further question sets
                  "texts": {name: str},                  # further texts, perplexity only
                  "task_max_new_tokens": int, "save_logits": path or null} or null}

Latency: the harness owns the loop; the runtime only prefills and decodes. Each repetition
prefills the prompt (time to first token, prefill tok/s), then for every context depth fills
the cache to that depth and times each decode step. Decoding runs through end tokens, so every
artifact decodes the same number of steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

from edgeft.bench.stats import summary, token_percentiles
from edgeft.isolate import die_with_parent, peak_rss_mb
from edgeft.session import MIN_NEW_TOKENS, supports

_WARMUP_TOKENS = 8


def _rss_mb() -> float:
    """Current resident set size in MB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 1e6
    except (OSError, ValueError, IndexError):
        return float("nan")


def _tiled(tokens: list[int], n: int) -> list[int]:
    """``n`` prompt tokens cut from ``tokens`` repeated (timing does not care what they say)."""
    if not tokens:
        raise ValueError("no tokens to build a prompt from")
    reps = -(-n // len(tokens))
    return (tokens * reps)[:n]


def _decode_steps(session, n: int) -> list[float]:
    steps = []
    for _ in range(n):
        start = time.perf_counter()
        session.decode_one()
        steps.append(time.perf_counter() - start)
    return steps


def first_token_s(session, prompt: Sequence[int]) -> float:
    """Seconds from a prompt to its first generated token (prefill, then one greedy step)."""
    start = time.perf_counter()
    session.prefill(prompt)
    session.decode_one()
    return time.perf_counter() - start


@contextlib.contextmanager
def _decoding_on(session, steps: int) -> Iterator[None]:
    """A session that stops at end tokens decodes through them for ``steps`` steps after each
    prefill, where it can be told to (genai): every artifact then decodes alike."""
    masked = supports(session, MIN_NEW_TOKENS)
    if masked:
        session.min_new_tokens = steps + 1
    try:
        yield
    finally:
        if masked:
            session.min_new_tokens = 0


def timed_round(session, prompt: Sequence[int], new_tokens: int) -> tuple[float, float]:
    """One prefill of ``prompt`` then ``new_tokens`` greedy steps, timed as the harness times
    them: (prefill tok/s, decode tok/s), through end tokens (:func:`_decoding_on`)."""
    with _decoding_on(session, new_tokens):
        start = time.perf_counter()
        session.prefill(prompt)
        prefill_s = time.perf_counter() - start
        steps = _decode_steps(session, new_tokens)
    return len(prompt) / prefill_s, len(steps) / sum(steps)


def measure_latency(session, tokens: list[int], settings: dict, notes: list[str]) -> dict:
    """Time to first token, prefill and decode speed at each depth, per-token percentiles."""
    prompt_n, decode_n = settings["prompt_tokens"], settings["decode_tokens"]
    limit = getattr(session, "n_ctx", None)
    depths = []
    for depth in settings["depths"]:
        if limit and max(depth, 1) + decode_n + 1 > limit:
            notes.append(f"depth {depth} skipped: {limit}-token context")
        else:
            depths.append(depth)
    if limit and prompt_n + 1 > limit:
        prompt_n = limit - 1
        notes.append(f"prompt cut to {prompt_n} tokens: {limit}-token context")
    prompt = _tiled(tokens, prompt_n)
    ttft, prefill = [], []
    steps: dict[int, list[list[float]]] = {d: [] for d in depths}
    with _decoding_on(session, decode_n):
        for _ in range(settings["warmup"]):
            session.prefill(prompt[:_WARMUP_TOKENS])
            _decode_steps(session, _WARMUP_TOKENS)
        for _ in range(settings["repeats"]):
            start = time.perf_counter()
            session.prefill(prompt)  # its last logits hold the first token
            seconds = time.perf_counter() - start
            ttft.append(seconds * 1000)
            prefill.append(len(prompt) / seconds)
            for depth in depths:
                session.prefill(_tiled(tokens, max(depth, 1)))
                steps[depth].append(_decode_steps(session, decode_n))
    return {
        "ttft_ms": summary(ttft),
        "prefill_tok_s": summary(prefill),
        "decode": [
            {
                "depth": depth,
                "tok_s": summary([len(run) / sum(run) for run in runs]),
                "token_ms": token_percentiles([s for run in runs for s in run]),
                "predicted_tok_s": None,
            }
            for depth, runs in steps.items()
        ],
    }


def measure_accuracy(session, spec: dict, notes: list[str]) -> tuple[dict, list[int]]:
    """Perplexity, agreement with each reference, tokenizer drift and task accuracy."""
    import numpy as np

    from edgeft.parity import compare_logits, perplexity

    text_ids = session.tokenize(spec["eval_text"])
    limit = getattr(session, "n_ctx", None)
    ids = _fitted(spec["eval_ids"] or text_ids[: spec["max_eval_tokens"]], limit, "eval", notes)
    result: dict = {"perplexity": None, "vs": {}, "tokenizer_matches_reference": None}
    if spec["eval_ids"] is not None:
        mine = text_ids[: len(ids)]
        result["tokenizer_matches_reference"] = mine == ids
        if mine != ids:
            at = next((i for i, (a, b) in enumerate(zip(mine, ids, strict=False)) if a != b), None)
            at = min(len(mine), len(ids)) if at is None else at
            notes.append(f"tokenizer differs from the reference's at eval token {at}")
    if len(ids) >= 2:
        logits = session.logits(ids)
        if not np.isfinite(logits).all():
            notes.append("non-finite logits on the eval text")
        result["perplexity"] = perplexity(logits, ids)
        if spec.get("save_logits"):
            np.save(spec["save_logits"], logits.astype(np.float32), allow_pickle=False)
        for ref in spec["references"]:
            reference = np.load(ref["logits"], mmap_mode="r", allow_pickle=False)
            if reference.shape != logits.shape:
                notes.append(
                    f"not compared with {ref['name']}: logits {tuple(logits.shape)} vs "
                    f"{tuple(reference.shape)} (a different vocabulary?)"
                )
                continue
            result["vs"][ref["name"]] = compare_logits(reference, logits).as_dict()
        del logits
    for name, text in (spec.get("texts") or {}).items():
        text_ids = _fitted(session.tokenize(text)[: spec["max_eval_tokens"]], limit, name, notes)
        result.setdefault("texts", {})[name] = {
            "perplexity": perplexity(session.logits(text_ids), text_ids)
            if len(text_ids) > 1
            else None,
            "tokens": len(text_ids),
        }
    max_new = spec["task_max_new_tokens"]
    result["task"] = (
        _task(session, spec["task"], max_new, limit, notes) if spec.get("task") else None
    )
    for name, rows in (spec.get("tasks") or {}).items():
        result.setdefault("tasks", {})[name] = _task(session, rows, max_new, limit, notes)
    return result, ids


def _fitted(ids: list[int], limit: int | None, what: str, notes: list[str]) -> list[int]:
    """``ids`` cut to leave one free position in a ``limit``-token context (some runtimes need
    it after a prompt), with a note when cut."""
    if limit and len(ids) >= limit:
        notes.append(f"{what} text cut to {limit - 1} tokens: {limit}-token context")
        return ids[: limit - 1]
    return ids


def _task(session, rows: list[dict], max_new: int, limit: int | None, notes: list[str]) -> dict:
    """Accuracy on one question set, with the median prompt's length and time to first token
    (median of three prefills of that prompt and one greedy step)."""
    import statistics

    from edgeft.evaluate import QARow, task_accuracy

    rows = [
        QARow(
            f"question {i + 1}",
            r["question"],
            tuple(r["answers"]),
            context=tuple(r.get("context") or ()),
        )
        for i, r in enumerate(rows)
    ]
    prompts = [session.tokenize(r.question, chat=True, context=r.context) for r in rows]
    if limit:
        longest = max(len(p) for p in prompts)
        if longest + max_new >= limit:
            max_new = max(1, limit - longest - 1)
            notes.append(f"task replies cut to {max_new} tokens: {limit}-token context")
    task = task_accuracy(session, rows, max_new_tokens=max_new, progress=False, prompts=prompts)
    median = sorted(prompts, key=len)[len(prompts) // 2]
    ttft = [first_token_s(session, median) * 1000 for _ in range(3)]
    return {
        "accuracy": task.accuracy,
        "correct": task.correct,
        "total": task.total,
        "prompt_tokens": len(median),
        "ttft_ms": statistics.median(ttft),
        "replies": task.replies,
    }


def run(spec: dict) -> dict:
    """Load the artifact and measure what the spec asks; errors become ``status: failed``."""
    notes: list[str] = []
    out: dict = {"status": "ok", "error": None, "latency": None, "accuracy": None, "notes": notes}
    try:
        from edgeft.runtimes import get_runtime

        runtime = get_runtime(spec["runtime"])
        if spec.get("emulation"):
            from edgeft.devices.emulate import Emulation, apply_emulation

            # available() imports the runtime's libraries: the memory cap sits above them
            runtime.available()
            notes += apply_emulation(Emulation(**spec["emulation"]))
        base_rss = _rss_mb()
        start = time.perf_counter()
        adapter = spec.get("adapter")
        if adapter is None:
            session = runtime.load(Path(spec["artifact"]), threads=spec["threads"])
        elif spec["runtime"] == "llama.cpp":
            session = runtime.load(
                Path(spec["artifact"]), threads=spec["threads"], lora_path=Path(adapter)
            )
        else:
            session = runtime.load(
                Path(spec["artifact"]), threads=spec["threads"], adapter=Path(adapter)
            )
        load_s = time.perf_counter() - start
        try:
            accuracy = spec.get("accuracy")
            tokens = (accuracy or {}).get("eval_ids") or session.tokenize(
                (accuracy or {}).get("eval_text") or "The quick brown fox jumps over the lazy dog."
            )
            if spec.get("latency"):
                out["latency"] = measure_latency(session, tokens, spec["latency"], notes)
                out["latency"]["load_s"] = load_s
                # Before the accuracy pass, whose [tokens, vocab] logit arrays are the harness's
                # own working memory, not the model's.
                out["latency"]["peak_rss_mb"] = peak_rss_mb()
                out["latency"]["base_rss_mb"] = base_rss
            if accuracy:
                out["accuracy"], out["eval_ids"] = measure_accuracy(session, accuracy, notes)
            out["n_ctx"] = getattr(session, "n_ctx", None)
        finally:
            session.close()
    except Exception as exc:  # noqa: BLE001 - reported in the row, the run goes on
        from edgeft.errors import EdgeftError

        out["status"] = "failed"
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        out["error"] = (
            message if isinstance(exc, EdgeftError) else f"{type(exc).__name__}: {message}"
        )
        out["traceback"] = traceback.format_exc()
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m edgeft.bench.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    die_with_parent(int(os.environ.get("EDGEFT_PARENT_PID") or os.getppid()))
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    result = run(spec)
    tmp = Path(args[1]).with_name(f".{Path(args[1]).name}.tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.replace(args[1])
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
