"""The shipped cooking dataset and the demo's scoring and report."""

import json

import pytest

from edgeft.demo import DEMO_SETTINGS, dataset_path
from edgeft.evaluate import contains_answer, load_qa
from edgeft.models import default_gguf_path, tokenizer_from_gguf


@pytest.fixture(scope="module")
def train_rows():
    lines = dataset_path("train.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_training_set_is_valid_for_the_default_tokenizer():
    from edgeft.data import load_examples

    tokenizer = tokenizer_from_gguf(default_gguf_path())
    examples, report = load_examples(
        dataset_path("train.jsonl"), tokenizer, max_length=DEMO_SETTINGS.max_length
    )
    assert report.rows >= 300 and not report.skipped and report.truncated == 0
    assert all(e.n_label_tokens > 0 for e in examples)


def test_held_out_questions_are_unseen_and_their_facts_are_taught(train_rows):
    heldout = load_qa(dataset_path("heldout.jsonl"))
    assert len(heldout) >= 50
    questions = {r["messages"][0]["content"].strip().casefold() for r in train_rows}
    replies = [r["messages"][-1]["content"] for r in train_rows]
    for row in heldout:
        assert row.question.strip().casefold() not in questions, row.where
        assert any(contains_answer(reply, row.answers[:1]) for reply in replies), row.where


def test_contains_answer_normalizes_case_and_spaces():
    assert contains_answer("Cook it to  165°F\n(74°C).", ["165°f (74°c)"])
    assert not contains_answer("Cook it to 145°F.", ["165°F", "74°C"])


def test_report_shows_every_model(tmp_path):
    import copy

    from edgeft.bench.schema import example_results
    from edgeft.data import DataReport
    from edgeft.demo import BASE, TUNED, DemoResult, render_report
    from edgeft.merge import MergeResult
    from edgeft.parity import Parity
    from edgeft.train import TrainResult

    bench = example_results()
    merged = bench["artifacts"][0]
    base = copy.deepcopy(merged)
    base["name"] = "smollm2-135m-instruct"
    reply = {"question": "Q?", "expected": "165°F", "topic": "t"}
    base["accuracy"]["task"] = {
        "accuracy": 0.25,
        "correct": 1,
        "total": 4,
        "replies": [{**reply, "reply": "no", "correct": False}] * 4,
    }
    merged["accuracy"]["task"] = {
        "accuracy": 0.75,
        "correct": 3,
        "total": 4,
        "replies": [{**reply, "reply": "165°F", "correct": True}] * 4,
    }
    bench["artifacts"].insert(0, base)
    labels = {
        "smollm2-135m-instruct": BASE,
        "merged": TUNED,
        "model-q4_k_m.gguf": "GGUF Q4_K_M",
        "broken.gguf": "GGUF broken",
    }
    result = DemoResult(
        out=tmp_path,
        train=TrainResult(tmp_path, 0.5, 2.9, 0.1, 10, 60.0, 100.0, DataReport("d", rows=8), 2),
        merge=MergeResult(tmp_path, "dequantized", "fp32", Parity(1e-4, 1e-9, 1.0, 50), True, 14),
        bench=bench,
        labels=labels,
        seconds={"train": 60.0},
    )
    report = render_report(result)
    assert result.base_task.accuracy == 0.25 and result.tuned_task.correct == 3
    assert f"| {BASE} | torch | 25.0% (1/4) |" in report
    assert f"| {TUNED} | torch | 75.0% (3/4) | 0.0000 | 100.0% |" in report
    assert "| GGUF Q4_K_M | llama.cpp | 45.0% (30/67) | 0.1100 | 89.7% | 15.87 | 105.0 |" in report
    assert "| GGUF broken | llama.cpp | failed: broken.gguf: not a GGUF file |" in report
    assert "eval loss 2.900 → 0.100" in report
    assert "fine-tuned ✓: 165°F" in report
