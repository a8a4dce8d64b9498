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


def test_report_shows_both_models(tmp_path):
    from edgeft.data import DataReport
    from edgeft.demo import DemoResult, render_report
    from edgeft.evaluate import TaskResult
    from edgeft.merge import MergeResult
    from edgeft.parity import Parity
    from edgeft.train import TrainResult

    reply = {"question": "Q?", "expected": "165°F", "topic": "t"}
    base = TaskResult(1, 4, [{**reply, "reply": "no", "correct": False}] * 4)
    tuned = TaskResult(3, 4, [{**reply, "reply": "165°F", "correct": True}] * 4)
    result = DemoResult(
        out=tmp_path,
        train=TrainResult(tmp_path, 0.5, 2.9, 0.1, 10, 60.0, 100.0, DataReport("d", rows=8), 2),
        merge=MergeResult(tmp_path, "dequantized", "fp32", Parity(1e-4, 1e-9, 1.0, 50), True, 14),
        base_task=base,
        tuned_task=tuned,
        seconds={"train": 60.0},
    )
    report = render_report(result)
    assert "| base SmolLM2-135M-Instruct | 25.0% (1/4) | 2.900 |" in report
    assert "75.0% (3/4) | 0.100 |" in report
    assert "fine-tuned ✓: 165°F" in report
