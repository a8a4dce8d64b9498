"""``edgeft recommend``: the file to ship to a device, found by exporting and measuring the
candidates instead of guessing.

1. **Export** every candidate with the exporters (:data:`DEFAULT_CANDIDATES`: GGUF types with
   the importance matrix from the fine-tuning data and the common ones without, ONNX int8 and
   int4), into an exports folder that later runs reuse: an export whose ``edgeft.json`` names
   the same checkpoint weights and covers the types is not made again.
2. **Screen.** Each export already measured its files against the checkpoint (size, mean KL
   on the eval text). A candidate whose file is over ``max_size_mb``, or whose export KL is
   over twice ``max_mean_kl``, can no longer meet the budget and is not benchmarked.
3. **Bench** the rest in one ``edgeft bench`` run with the device profile (threads, memory
   cap, bandwidth-scaled decode speed, the profile's budgets under the user's) and the task.
4. **Choose**: among the files that meet every budget, the most accurate (task accuracy when
   a task is given, then mean KL against the checkpoint, then size); the Pareto front over
   size, decode speed and accuracy; and for every other candidate why it lost.

The output folder is a normal ``edgeft bench`` results folder plus ``recommendation.json``
(schema ``edgeft.recommendation/1``), which ``edgeft package`` takes in place of an artifact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeft._io import write_json
from edgeft.errors import EdgeftError
from edgeft.options import DEFAULT_THREADS
from edgeft.provenance import RECORD_NAME, find_record, read_record

SCHEMA = "edgeft.recommendation/1"
RECOMMENDATION = "recommendation.json"
# An export's KL on its eval text and the bench's on the same text differ by the context
# they are scored at; a candidate is dropped before benchmarking only when it is this far over.
KL_SCREEN_FACTOR = 2.0


@dataclass(frozen=True)
class Candidate:
    """One file to consider: ``gguf:q4_k_m`` (importance matrix where the data allows),
    ``gguf:q4_k_m:none`` (without), ``onnx:int4``."""

    format: str
    type: str
    imatrix: bool = True  # GGUF only

    @property
    def name(self) -> str:
        if self.format == "gguf" and not self.imatrix:
            return f"gguf {self.type} (no imatrix)"
        return f"{self.format} {self.type}"

    @property
    def spec(self) -> str:
        tail = ":none" if self.format == "gguf" and not self.imatrix else ""
        return f"{self.format}:{self.type}{tail}"


DEFAULT_CANDIDATES = (
    "gguf:q8_0,gguf:q6_k,gguf:q5_k_m,gguf:q4_k_m,gguf:q4_k_m:none,gguf:q4_0,gguf:q4_0:none,"
    "gguf:iq4_xs,gguf:iq3_m,gguf:q2_k,onnx:int8,onnx:int4"
)


def parse_candidates(spec: str) -> list[Candidate]:
    """``"gguf:q4_k_m,gguf:q4_k_m:none,onnx:int4"`` → candidates, checked.

    Raises:
        EdgeftError: an unknown format or type, or one written twice.
    """
    from edgeft.export.gguf.export import GGUF_TYPES
    from edgeft.export.gguf.quantize import IGNORES_IMATRIX, NEEDS_IMATRIX
    from edgeft.export.onnx.quantize import ONNX_TYPES

    candidates: list[Candidate] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        fmt, _, rest = item.partition(":")
        kind, _, flag = rest.partition(":")
        types = {"gguf": GGUF_TYPES, "onnx": ONNX_TYPES}.get(fmt)
        if types is None or kind not in types or flag not in ("", "none"):
            raise EdgeftError(
                f"--candidates: {item!r} is not FORMAT:TYPE[:none]; formats gguf "
                f"({', '.join(GGUF_TYPES)}) and onnx ({', '.join(ONNX_TYPES)}), ':none' for a "
                "GGUF without importance matrix"
            )
        if flag == "none" and (fmt != "gguf" or kind in NEEDS_IMATRIX):
            raise EdgeftError(
                f"--candidates: {item!r}: ':none' is for GGUF types that can do without an "
                "importance matrix"
            )
        candidate = Candidate(fmt, kind, imatrix=flag != "none" or kind in IGNORES_IMATRIX)
        if candidate in candidates:
            raise EdgeftError(
                f"--candidates: {item!r} is listed twice (or is the same file as another)"
            )
        candidates.append(candidate)
    if not candidates:
        raise EdgeftError("--candidates: no candidate given")
    return candidates


@dataclass
class Option:
    """A candidate's file and what is known of it."""

    candidate: Candidate
    path: Path | None = None
    export_bytes: int | None = None
    export_kl: float | None = None
    screened: str | None = None  # why it was not benchmarked
    row: dict | None = None  # its edgeft bench row
    verdict: str = ""
    on_front: bool = False

    def figures(self, reference: str | None, device: bool) -> dict:
        """Size, decode speed (the device's prediction with a profile), TTFT, KL, task."""
        from edgeft.bench.schema import decode_speed

        row = self.row or {}
        latency, accuracy = row.get("latency") or {}, row.get("accuracy") or {}
        speed = decode_speed(latency, device)
        vs = (accuracy.get("vs") or {}).get(reference) or {}
        return {
            "size_mb": (row.get("size_bytes") or self.export_bytes or 0) / 1e6 or None,
            "decode_tok_s": speed,
            "ttft_ms": (latency.get("ttft_ms") or {}).get("median"),
            "peak_rss_mb": latency.get("peak_rss_mb"),
            "mean_kl": vs.get("mean_kl", self.export_kl),
            "task_accuracy": (accuracy.get("task") or {}).get("accuracy"),
        }


@dataclass
class Recommendation:
    out: Path
    options: list[Option]
    pick: Option | None
    objective: str  # "task accuracy" or "mean KL"
    reference: str | None
    device: bool

    def as_dict(self) -> dict:
        def entry(option: Option) -> dict:
            return {
                "candidate": option.candidate.spec,
                "name": option.candidate.name,
                "path": str(option.path) if option.path else None,
                "bench_row": (option.row or {}).get("name"),
                "benchmarked": option.row is not None,
                "on_front": option.on_front,
                "verdict": option.verdict,
                **option.figures(self.reference, self.device),
                "paired_with_pick": paired(self.pick.row, option.row)
                if self.pick and option.row and option is not self.pick
                else None,
            }

        return {
            "schema": SCHEMA,
            "objective": self.objective,
            "reference": self.reference,
            "pick": entry(self.pick) if self.pick else None,
            "front": [o.candidate.name for o in self.options if o.on_front],
            "candidates": [entry(o) for o in self.options],
            "results": "results.json",
        }


def _cached(folder: Path, stage: str, weights_sha256: str, types: list[str]):
    """The record of an earlier export in ``folder`` that covers ``types`` of these weights."""
    if not (folder / RECORD_NAME).is_file():
        if folder.exists():
            raise EdgeftError(
                f"{folder} exists and is not an edgeft export; pass another --exports folder"
            )
        return None
    record = find_record(folder, stage)
    same = record.inputs.model.weights_sha256 == weights_sha256
    covered = set(types) <= set(record.settings.types)
    return record if same and covered else None


def _export(model: Path, exports: Path, options: list[Option], calibration, threads, say):
    """Export every candidate (or reuse an earlier export of the same weights) and note each
    file's path, size and export KL."""
    from edgeft.export.gguf import export_gguf
    from edgeft.export.onnx import export_onnx
    from edgeft.models import weights_sha256

    sha = weights_sha256(model)
    groups = {
        ("gguf", True): exports / "gguf",
        ("gguf", False): exports / "gguf-no-imatrix",
        ("onnx", True): exports / "onnx",
    }
    for (fmt, imatrix), folder in groups.items():
        members = [
            o
            for o in options
            if o.candidate.format == fmt and (fmt == "onnx" or o.candidate.imatrix == imatrix)
        ]
        if not members:
            continue
        types = [o.candidate.type for o in members]
        stage = f"export-{fmt}"
        record = _cached(folder, stage, sha, types)
        if record is not None:
            say(f"reusing {folder} ({', '.join(types)})")
        else:
            say(f"exporting {', '.join(types)} to {folder}")
            if fmt == "gguf":
                export_gguf(
                    model,
                    folder,
                    types,
                    imatrix=None if imatrix else "none",
                    calibration=calibration,
                    threads=threads,
                    force=True,
                )
            else:
                export_onnx(
                    model, folder, types, calibration=calibration, threads=threads, force=True
                )
            record = read_record(folder, stage)
        reports = record.results.files if fmt == "gguf" else record.results.folders
        by_type = {r.type: r for r in reports}
        for option in members:
            report = by_type[option.candidate.type]
            option.path = folder / (report.file if fmt == "gguf" else report.folder)
            option.export_bytes = report.bytes
            option.export_kl = report.parity.mean_kl


def _screen(options: list[Option], budgets) -> None:
    for option in options:
        size_mb = (option.export_bytes or 0) / 1e6
        if budgets.max_size_mb is not None and size_mb > budgets.max_size_mb:
            option.screened = f"too big: {size_mb:.1f} MB > {budgets.max_size_mb:g} MB"
        elif (
            budgets.max_mean_kl is not None
            and option.export_kl is not None
            and option.export_kl > KL_SCREEN_FACTOR * budgets.max_mean_kl
        ):
            option.screened = (
                f"too far from the checkpoint: mean KL {option.export_kl:.3g} at export, over "
                f"{KL_SCREEN_FACTOR:g}× the {budgets.max_mean_kl:g} budget"
            )
        if option.screened:
            option.verdict = f"not benchmarked: {option.screened}"


def _accuracy_key(figures: dict, by_task: bool) -> tuple:
    """Sorts the most accurate first."""
    task = figures["task_accuracy"]
    kl = figures["mean_kl"]
    return (
        -(task if by_task and task is not None else 0.0),
        kl if kl is not None else float("inf"),
        figures["size_mb"] or float("inf"),
    )


def _dominates(a: dict, b: dict, by_task: bool) -> bool:
    """``a`` is no bigger, no slower and no less accurate than ``b``, and better in one."""
    acc = "task_accuracy" if by_task else "mean_kl"
    sign = 1 if by_task else -1
    if any(a[k] is None or b[k] is None for k in ("size_mb", "decode_tok_s", acc)):
        return False
    no_worse = (
        a["size_mb"] <= b["size_mb"]
        and a["decode_tok_s"] >= b["decode_tok_s"]
        and sign * a[acc] >= sign * b[acc]
    )
    better = (
        a["size_mb"] < b["size_mb"]
        or a["decode_tok_s"] > b["decode_tok_s"]
        or sign * a[acc] > sign * b[acc]
    )
    return no_worse and better


def _describe(name: str, value, limit) -> str:
    from edgeft.bench.report import BUDGETS

    what, op, unit = BUDGETS.get(name, (name, "limit", ""))
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    return f"{what} {shown} (needs {op} {limit:g}{' ' + unit if unit else ''})"


def _correct(row: dict) -> list[bool] | None:
    replies = ((row.get("accuracy") or {}).get("task") or {}).get("replies")
    return [bool(r.get("correct")) for r in replies] if replies else None


def paired(pick: dict, other: dict) -> dict | None:
    """The two files' answers to the same questions: how many only the pick gets right, how
    many only the other, and the exact two-sided sign test's p-value of that split (McNemar's
    test): a difference of a few questions is often within what a re-run of the same file on
    other wording would move."""
    a, b = _correct(pick), _correct(other)
    if a is None or b is None or len(a) != len(b):
        return None
    only_pick = sum(x and not y for x, y in zip(a, b, strict=True))
    only_other = sum(y and not x for x, y in zip(a, b, strict=True))
    n = only_pick + only_other
    tail = sum(math.comb(n, k) for k in range(min(only_pick, only_other) + 1)) / 2**n if n else 1
    return {"only_pick": only_pick, "only_other": only_other, "p": min(1.0, 2 * tail)}


def _pick(meeting: list[Option], figures: dict, by_task: bool, margin: float) -> Option | None:
    """The most accurate option, or with a task the smallest of those within ``margin`` of
    the best accuracy (equal accuracy: the smaller file)."""
    if not meeting:
        return None
    if not by_task:
        return min(meeting, key=lambda o: _accuracy_key(figures[id(o)], by_task))
    best = max(figures[id(o)]["task_accuracy"] or 0.0 for o in meeting)
    near = [o for o in meeting if (figures[id(o)]["task_accuracy"] or 0.0) >= best - margin - 1e-9]
    return min(
        near,
        key=lambda o: (
            figures[id(o)]["size_mb"] or float("inf"),
            -(figures[id(o)]["decode_tok_s"] or 0.0),
            _accuracy_key(figures[id(o)], by_task),
        ),
    )


def _choose(
    options: list[Option], reference, device: bool, by_task: bool, margin: float = 0.0
) -> Option | None:
    """Set each option's verdict and front membership; return the pick."""
    benched = [o for o in options if o.row is not None and o.row["status"] == "ok"]
    figures = {id(o): o.figures(reference, device) for o in benched}
    for option in benched:
        option.on_front = not any(
            _dominates(figures[id(other)], figures[id(option)], by_task)
            for other in benched
            if other is not option
        )
    meeting = [o for o in benched if o.row["passed"]]
    pick = _pick(meeting, figures, by_task, margin)
    accuracy = "task accuracy" if by_task else "mean KL"
    for option in options:
        if option.screened:
            continue
        if option.row is None or option.row["status"] != "ok":
            error = (option.row or {}).get("error") or "not run"
            option.verdict = f"failed: {str(error).splitlines()[0][:160]}"
            continue
        mine = figures[id(option)]
        if option is pick:
            best = by_task and all(
                (mine["task_accuracy"] or 0) >= (figures[id(o)]["task_accuracy"] or 0)
                for o in meeting
            )
            option.verdict = (
                f"meets every budget, and the best {accuracy} of those that do"
                if best or not by_task
                else f"meets every budget, the smallest within {margin:.1%} of the best {accuracy}"
            )
            if best and any(
                o is not pick and figures[id(o)]["task_accuracy"] == mine["task_accuracy"]
                for o in meeting
            ):
                option.verdict += " (the smallest of those that tie)"
            continue
        missed = [b for b in option.row.get("budgets", []) if not b["passed"]]
        if missed:
            option.verdict = "misses " + "; ".join(
                _describe(b["name"], b["value"], b["limit"]) for b in missed
            )
        else:
            theirs = figures[id(pick)]
            mine_acc, their_acc = mine["task_accuracy"] or 0, theirs["task_accuracy"] or 0
            if by_task and mine_acc < their_acc:
                detail = f"task accuracy {mine_acc:.1%} vs {their_acc:.1%}"
                split = paired(pick.row, option.row)
                if split:
                    detail += (
                        f"; {split['only_pick']} questions only the pick answers, "
                        f"{split['only_other']} only this one, paired p = {split['p']:.2g}"
                    )
                option.verdict = (
                    f"meets every budget, less accurate than {pick.candidate.name} ({detail})"
                )
            elif by_task:
                option.verdict = (
                    f"meets every budget and answers as well or better (task accuracy "
                    f"{mine_acc:.1%}), but {pick.candidate.name} is smaller "
                    f"({theirs['size_mb']:.1f} MB vs {mine['size_mb']:.1f} MB)"
                )
            else:
                detail = (
                    f"mean KL {mine['mean_kl']:.3g} vs {theirs['mean_kl']:.3g}"
                    if mine["mean_kl"] != theirs["mean_kl"]
                    else f"{mine['size_mb']:.1f} MB vs {theirs['size_mb']:.1f} MB"
                )
                option.verdict = (
                    f"meets every budget, less accurate than {pick.candidate.name} ({detail})"
                )
        dominator = next(
            (
                other
                for other in benched
                if other is not option and _dominates(figures[id(other)], mine, by_task)
            ),
            None,
        )
        if dominator is not None:
            option.verdict += (
                f"; {dominator.candidate.name} is smaller or as small, faster or as fast and "
                "at least as accurate"
            )
    return pick


def recommend(
    model: Path,
    out: Path,
    *,
    device: str | None = None,
    budgets=None,
    task: Path | None = None,
    report_tasks: dict[str, Path] | None = None,
    accuracy_margin: float = 0.0,
    candidates: Sequence[Candidate] | str = DEFAULT_CANDIDATES,
    calibration: Path | None = None,
    exports: Path | None = None,
    settings=None,
    force: bool = False,
    log=print,
) -> Recommendation:
    """Export the candidates, bench them on ``device``, and choose one (see the module).

    Args:
        model: the merged checkpoint to ship.
        out: the bench results folder, plus ``recommendation.json``.
        device: a device profile name or .toml (its budgets apply under ``budgets``).
        budgets: :class:`edgeft.bench.harness.Budgets`; ``max_size_mb`` also screens exports.
        task: held-out questions; the pick is then the best task accuracy that meets the
            budgets (else the lowest mean KL against the checkpoint): a dev split.
        report_tasks: further question sets by name, scored and reported but not chosen on
            (a test split no choice looked at).
        accuracy_margin: with a task, the pick is the smallest file whose task accuracy is
            within this of the best (0: the best, the smaller file on a tie).
        exports: where the candidate files are written and found again (default
            ``<out>-exports`` beside ``out``).

    Raises:
        EdgeftError: bad candidates, an output that exists without ``force``, an exports
            folder that holds something else.
    """
    from edgeft._io import check_output
    from edgeft.bench.harness import Budgets, bench

    model, out = Path(model), Path(out)
    budgets = budgets or Budgets()
    if not 0 <= accuracy_margin < 1:
        raise EdgeftError(f"--accuracy-margin must be in [0, 1); got {accuracy_margin}")
    if isinstance(candidates, str):
        candidates = parse_candidates(candidates)
    check_output(out, force)
    if not (model / "config.json").is_file():
        raise EdgeftError(f"--model {model}: not a Hugging Face checkpoint folder (no config.json)")
    exports = Path(exports) if exports else out.with_name(f"{out.name}-exports")
    options = [Option(candidate) for candidate in candidates]
    threads = settings.threads if settings else DEFAULT_THREADS
    _export(model, exports, options, calibration, threads, log)
    if device:
        from edgeft.devices import get_profile

        budgets = budgets.over(Budgets(**get_profile(device).budgets.model_dump()))
    _screen(options, budgets)
    chosen = [o for o in options if not o.screened]
    results = None
    if chosen:
        log(f"benchmarking {len(chosen)} of {len(options)} candidates")
        results = bench(
            [str(o.path) for o in chosen],
            out,
            task_path=task,
            extra_tasks=report_tasks,
            device=device,
            settings=settings,
            budgets=budgets,
            force=force,
            progress=False,
            log=log,
        )
        for option, row in zip(chosen, results["artifacts"], strict=True):
            option.row = row
    reference = results["references"][0]["name"] if results and results["references"] else None
    by_task = task is not None
    pick = _choose(options, reference, device is not None, by_task, accuracy_margin)
    recommendation = Recommendation(
        out=out,
        options=options,
        pick=pick,
        objective="task accuracy" if by_task else "mean KL",
        reference=reference,
        device=device is not None,
    )
    if results is None:
        out.mkdir(parents=True, exist_ok=True)
    write_json(out / RECOMMENDATION, recommendation.as_dict())
    return recommendation


def read_pick(path: Path) -> tuple[Path, Path | None]:
    """``(the picked file, the bench results it was measured in)`` from a ``recommend`` folder
    or its ``recommendation.json``.

    Raises:
        EdgeftError: no recommendation there, or it picked nothing.
    """
    path = Path(path)
    file = path / RECOMMENDATION if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgeftError(f"{file}: not a readable recommendation ({exc})") from None
    if data.get("schema") != SCHEMA:
        raise EdgeftError(f"{file}: schema is not {SCHEMA!r}")
    if not data.get("pick"):
        raise EdgeftError(f"{file}: no candidate met the budgets; there is nothing to package")
    results = file.parent / str(data.get("results") or "results.json")
    return Path(data["pick"]["path"]), results if results.is_file() else None
