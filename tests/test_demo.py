"""The shipped case-study data, the in-context baseline, retention scoring and the demo end to
end on a tiny model."""

import json

import pytest
from conftest import write_jsonl

from edgeft.demo import DEMO_SETTINGS, dataset_path, general_path
from edgeft.errors import DataError
from edgeft.evaluate import QARow, contains_answer, load_qa
from edgeft.incontext import ExamplePool, with_examples
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


@pytest.mark.parametrize("split", ["dev.jsonl", "test.jsonl"])
def test_held_out_questions_are_unseen_and_their_facts_are_taught(train_rows, split):
    rows = load_qa(dataset_path(split))
    assert len(rows) >= 60
    assert {r.topic for r in rows} == {
        "temperature",
        "substitution",
        "conversion",
        "timing",
        "storage",
    }
    questions = {r["messages"][0]["content"].strip().casefold() for r in train_rows}
    replies = [r["messages"][-1]["content"] for r in train_rows]
    for row in rows:
        assert row.question.strip().casefold() not in questions, row.where
        assert any(contains_answer(reply, row.answers[:1]) for reply in replies), row.where


def test_dev_and_test_sets_share_no_question():
    dev = {r.question.casefold() for r in load_qa(dataset_path("dev.jsonl"))}
    test = {r.question.casefold() for r in load_qa(dataset_path("test.jsonl"))}
    assert not dev & test
    general_dev = {r.question for r in load_qa(general_path("dev.jsonl"))}
    general_test = {r.question for r in load_qa(general_path("test.jsonl"))}
    assert len(general_test) >= 40 and not general_dev & general_test


def test_replay_rows_are_general_chat_rows_apart_from_the_general_questions():
    rows = [json.loads(line) for line in general_path("replay.jsonl").read_text().splitlines()]
    assert len(rows) >= 100
    asked = {
        r.question for name in ("dev.jsonl", "test.jsonl") for r in load_qa(general_path(name))
    }
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"].strip() and user["content"] not in asked


def test_contains_answer_normalizes_case_and_spaces():
    assert contains_answer("Cook it to  165°F\n(74°C).", ["165°f (74°c)"])
    assert not contains_answer("Cook it to 145°F.", ["165°F", "74°C"])


def test_question_context_is_validated(tmp_path):
    good = {"question": "Q?", "answers": ["a"], "context": [{"role": "user", "content": "x"}]}
    assert load_qa(write_jsonl(tmp_path / "ok.jsonl", [good]))[0].context == (
        {"role": "user", "content": "x"},
    )
    bad = {**good, "context": [{"role": "tool", "content": "x"}]}
    with pytest.raises(DataError, match=r"bad.jsonl:1: 'context' must be"):
        load_qa(write_jsonl(tmp_path / "bad.jsonl", [bad]))


def _row(question: str) -> QARow:
    return QARow("test", question, ("x",))


def test_in_context_examples_are_the_nearest_training_rows_most_similar_last():
    pool = ExamplePool(
        [
            ("How long do I boil an egg?", "Ten minutes."),
            ("What temperature for chicken?", "165°F (74°C)."),
            ("How do I store rice?", "In the fridge."),
        ]
    )
    [row] = with_examples([_row("What temperature is safe for chicken thighs?")], pool, 2)
    users = [t["content"] for t in row.context if t["role"] == "user"]
    assert users[-1] == "What temperature for chicken?"
    assert len(users) == 2 and row.context[-1]["role"] == "assistant"
    again = with_examples([_row("What temperature is safe for chicken thighs?")], pool, 2)
    assert again[0].context == row.context  # deterministic


def test_in_context_examples_never_show_the_question_itself():
    pool = ExamplePool([("What temperature for chicken?", "165°F."), ("Store rice?", "Fridge.")])
    [row] = with_examples([_row("what temperature  for CHICKEN?")], pool, 2, system="Be brief.")
    assert row.context[0] == {"role": "system", "content": "Be brief."}
    assert all(t["content"] != "What temperature for chicken?" for t in row.context)


def test_in_context_examples_are_dropped_until_the_prompt_fits():
    pool = ExamplePool([(f"question {i}", "answer " * 50) for i in range(8)])
    [row] = with_examples(
        [_row("question 3")],
        pool,
        8,
        fits=lambda r: sum(len(t["content"]) for t in r.context) < 700,
    )
    assert 0 < len(row.context) // 2 < 8
    assert sum(len(t["content"]) for t in row.context) < 700
    with pytest.raises(DataError, match="does not fit"):
        with_examples([_row("q")], pool, 2, fits=lambda r: False)


def test_shipped_in_context_prompts_never_use_a_test_question():
    pool = ExamplePool.from_file(dataset_path("train.jsonl"))
    test = load_qa(dataset_path("test.jsonl"))
    asked = {r.question.casefold() for r in test}
    for row in with_examples(test, pool, 4):
        shown = [t["content"].casefold() for t in row.context if t["role"] == "user"]
        assert len(shown) == 4 and not asked & set(shown)


def test_retention_counts_only_what_the_base_answered():
    from edgeft.demo import retention

    def row(*correct):
        replies = [{"correct": c} for c in correct]
        return {"accuracy": {"tasks": {"general": {"replies": replies}}}}

    assert retention(row(True, True, False, True), row(True, False, True, True)) == (2, 3)
    assert retention(row(False), row(True)) == (0, 0)
    assert retention({"accuracy": {}}, row(True)) is None


def test_demo_runs_end_to_end_on_a_tiny_model(tiny_llama, tmp_path):
    """Both fine-tunings, both merges, the four exports, the base exports, both benches and the
    report with every row."""
    import dataclasses

    from edgeft.demo import (
        BASE,
        BASE_Q8,
        IN_CONTEXT,
        TUNED,
        TUNED_LORA,
        demo,
        load_demo,
        write_report,
    )

    settings = dataclasses.replace(
        DEMO_SETTINGS, max_steps=2, batch_size=4, rank=4, alpha=8, eval_fraction=0.02
    )
    result = demo(
        tmp_path / "demo",
        base=str(tiny_llama),
        settings=settings,
        questions=3,
        shots=2,
        progress=False,
        log=lambda message: None,
    )
    labels = [label for label, _ in result.rows()]
    icl = IN_CONTEXT.format(k=2)
    assert labels[:4] == [
        BASE,
        BASE_Q8,
        icl.replace("base", "base Q8_0"),
        icl.replace("base", "base int8"),
    ]
    assert labels[4:] == [
        TUNED_LORA,
        TUNED,
        "GGUF Q8_0",
        "GGUF Q4_K_M",
        "ONNX int8",
        "ONNX int4",
    ]
    for label, row in result.rows():
        assert row["status"] == "ok", (label, row["error"])
        task = row["accuracy"]["task"]
        assert task["total"] == 3 and task["prompt_tokens"] > 0 and task["ttft_ms"] > 0
    # the in-context prompts are longer than the zero-shot ones
    assert (
        result.row(labels[2])["accuracy"]["task"]["prompt_tokens"]
        > (result.row(BASE)["accuracy"]["task"]["prompt_tokens"])
    )
    assert result.row(TUNED)["accuracy"]["tasks"]["general"]["total"] == 3
    assert result.row(TUNED)["accuracy"]["texts"]["general"]["perplexity"] > 1
    assert set(result.runs) == {"qlora", "lora"}
    assert all(run.peak_rss_mb and run.steps == 2 for run in result.runs.values())
    # the general replay rows are held to the base model, not trained on as cooking rows are
    replay = len(general_path("replay.jsonl").read_text().splitlines())
    assert all(run.preserve_rows == replay for run in result.runs.values())
    report = (result.out / "report.md").read_text()
    assert f"{replay} general rows held to the base model" in report
    for label in labels:
        assert f"| {label} |" in report
    assert "## LoRA against QLoRA" in report and "![" in report
    page = (result.out / "report.html").read_text()
    assert "<table>" in page and "data:image/png;base64," in page
    record = json.loads((result.out / "demo.json").read_text())
    assert set(record["models"]) == set(labels)
    # a finished folder renders the same report again without running
    again = load_demo(result.out)
    assert [label for label, _ in again.rows()] == labels
    write_report(again)
    assert (result.out / "report.md").read_text() == report
