"""``edgeft recommend``: export the candidates, bench them, pick the most accurate that meets
the budgets, and say why each other one lost."""

from __future__ import annotations

import json

import pytest

from edgeft.bench.harness import BenchSettings, Budgets
from edgeft.errors import EdgeftError
from edgeft.recommend import RECOMMENDATION, parse_candidates, read_pick, recommend

FAST = BenchSettings(threads=1, prompt_tokens=16, decode_tokens=4, depths=(0,), repeats=1, warmup=0)
CANDIDATES = "gguf:q8_0,gguf:q4_0:none,onnx:int8"


@pytest.fixture(scope="module")
def first(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("recommend") / "r"
    return recommend(tiny_llama, out, candidates=CANDIDATES, settings=FAST, log=lambda _: None)


def test_without_budgets_the_lowest_kl_is_picked(first):
    figures = {o.candidate.spec: o.figures(first.reference, False) for o in first.options}
    assert all(o.row is not None and o.row["status"] == "ok" for o in first.options)
    best = min(figures, key=lambda spec: figures[spec]["mean_kl"])
    assert first.pick.candidate.spec == best
    for option in first.options:
        if option is not first.pick:
            assert option.verdict.startswith("meets every budget, less accurate than")
    assert any(o.on_front for o in first.options) and first.pick.on_front
    saved = json.loads((first.out / RECOMMENDATION).read_text(encoding="utf-8"))
    assert saved["pick"]["candidate"] == best and (first.out / "results.json").is_file()
    assert read_pick(first.out)[0] == first.pick.path


def test_a_budget_only_one_candidate_meets_picks_it(first, tiny_llama, tmp_path):
    sizes = sorted((o.export_bytes, o.candidate.spec) for o in first.options)
    (smallest, name), (second, _) = sizes[0], sizes[1]
    assert smallest < second
    limit = (smallest + second) / 2 / 1e6
    exports = first.out.with_name(f"{first.out.name}-exports")
    made = {p: p.stat().st_mtime_ns for p in exports.rglob("*") if p.is_file()}
    result = recommend(
        tiny_llama,
        tmp_path / "r",
        candidates=CANDIDATES,
        budgets=Budgets(max_size_mb=limit),
        exports=exports,
        settings=FAST,
        log=lambda _: None,
    )
    assert result.pick.candidate.spec == name
    others = [o for o in result.options if o is not result.pick]
    assert all(o.row is None and o.verdict.startswith("not benchmarked: too big") for o in others)
    # the exports of the first run were reused, not made again
    assert {p: p.stat().st_mtime_ns for p in exports.rglob("*") if p.is_file()} == made


def test_no_candidate_meets_the_budgets(first, tiny_llama, tmp_path):
    result = recommend(
        tiny_llama,
        tmp_path / "r",
        candidates="gguf:q8_0",
        budgets=Budgets(min_decode_tok_s=1e9),
        exports=first.out.with_name(f"{first.out.name}-exports"),
        settings=FAST,
        log=lambda _: None,
    )
    assert result.pick is None
    assert result.options[0].verdict.startswith("misses decode speed")
    with pytest.raises(EdgeftError, match="no candidate met the budgets"):
        read_pick(tmp_path / "r")


def test_package_takes_the_pick(first, tmp_path):
    from edgeft.package import MANIFEST, package

    bundle = package(str(first.out), tmp_path / "b", "android")
    manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["bench"] is not None  # the figures it was chosen on
    assert manifest["model"]["format"] == first.pick.candidate.format


def test_candidates_are_checked():
    assert [c.spec for c in parse_candidates("gguf:q4_k_m, gguf:q4_k_m:none,onnx:int4")] == [
        "gguf:q4_k_m",
        "gguf:q4_k_m:none",
        "onnx:int4",
    ]
    for bad, message in [
        ("gguf:q9", "is not FORMAT:TYPE"),
        ("onnx:int4:none", "':none' is for GGUF"),
        ("gguf:iq4_xs:none", "':none' is for GGUF"),
        ("gguf:q8_0,gguf:q8_0:none", "listed twice"),
        ("", "no candidate"),
    ]:
        with pytest.raises(EdgeftError, match=message):
            parse_candidates(bad)


def _option(spec: str, size_mb: float, correct: list[bool], kl: float = 0.1):
    from edgeft.recommend import Option

    fmt, _, kind = spec.partition(":")
    row = {
        "name": spec,
        "status": "ok",
        "passed": True,
        "budgets": [],
        "size_bytes": int(size_mb * 1e6),
        "latency": {"decode": [{"depth": 0, "tok_s": {"median": 100.0 / size_mb}}]},
        "accuracy": {
            "vs": {"ref": {"mean_kl": kl}},
            "task": {
                "accuracy": sum(correct) / len(correct),
                "replies": [{"correct": c} for c in correct],
            },
        },
    }
    return Option(parse_candidates(spec)[0], row=row)


def test_a_tie_goes_to_the_smaller_file_and_a_margin_to_the_smallest_near_the_best():
    from edgeft.recommend import _choose, paired

    right = [True] * 12 + [False] * 8  # 60%
    options = [
        _option("gguf:q8_0", 145, right, kl=0.005),
        _option("gguf:q4_k_m", 105, right[::-1][:8] + right[:12], kl=0.06),  # 60%, others
        _option("onnx:int4", 100, [True] * 11 + [False] * 9, kl=0.14),  # 55%
    ]
    pick = _choose(options, "ref", False, by_task=True)
    assert pick.candidate.spec == "gguf:q4_k_m"  # ties q8_0 at 60%, and is smaller
    assert "smallest of those that tie" in pick.verdict
    assert "answers as well or better" in options[0].verdict
    assert "paired p =" in options[2].verdict
    assert _choose(options, "ref", False, by_task=True, margin=0.05).candidate.spec == "onnx:int4"
    # without a task: the lowest mean KL
    assert _choose(options, "ref", False, by_task=False).candidate.spec == "gguf:q8_0"
    split = paired(options[0].row, options[2].row)
    assert (split["only_pick"], split["only_other"]) == (1, 0) and split["p"] == 1.0
    lopsided = paired(
        _option("gguf:q8_0", 1, [True] * 10).row, _option("gguf:q2_k", 1, [False] * 10).row
    )
    assert lopsided["only_pick"] == 10 and lopsided["p"] == pytest.approx(2 / 2**10)
