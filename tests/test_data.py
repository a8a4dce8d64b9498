import pytest
from conftest import write_jsonl

from edgeft.data import (
    IGNORE_INDEX,
    collate,
    encode,
    load_examples,
    row_to_messages,
    split_examples,
)
from edgeft.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How long do I boil an egg?"},
        {"role": "assistant", "content": "Ten minutes."},
        {"role": "user", "content": "And rice?"},
        {"role": "assistant", "content": "Eighteen minutes."},
    ]
    example = encode(tokenizer, messages, max_length=512, where="t:1")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]

    # Expected: tokens of "Ten minutes.<|im_end|>\n" and "Eighteen minutes.<|im_end|>\n".
    def ids(s):
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    segments = [
        (
            ids(
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow long do I boil an "
                "egg?<|im_end|>\n<|im_start|>assistant\n"
            ),
            False,
        ),
        (ids("Ten minutes.<|im_end|>\n"), True),
        (ids("<|im_start|>user\nAnd rice?<|im_end|>\n<|im_start|>assistant\n"), False),
        (ids("Eighteen minutes.<|im_end|>\n"), True),
    ]
    expected_ids = [i for seg, _ in segments for i in seg]
    expected_labels = [i if trained else IGNORE_INDEX for seg, trained in segments for i in seg]
    assert example.input_ids == expected_ids
    assert example.labels == expected_labels
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_ids = [i for i in example.labels if i != IGNORE_INDEX]
    assert trained_ids.count(im_end) == 2  # the end-of-turn token is learned, so generation stops


def test_instruction_forms_render_as_chat(tokenizer):
    alpaca = row_to_messages(
        {"instruction": "Convert", "input": "1 cup", "output": "240 ml"}, "x:1"
    )
    assert alpaca == [
        {"role": "user", "content": "Convert\n\n1 cup"},
        {"role": "assistant", "content": "240 ml"},
    ]
    prompt = row_to_messages({"prompt": "Hi", "completion": "Hello", "system": "S"}, "x:2")
    assert [m["role"] for m in prompt] == ["system", "user", "assistant"]
    no_input = row_to_messages({"instruction": "Convert", "input": "", "output": "x"}, "x:3")
    assert no_input[0]["content"] == "Convert"


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BAD_ROWS = [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"text": "hello"}, "needs exactly one of"),
    ({"prompt": "q"}, "missing field 'completion'"),
    ({"prompt": "q", "completion": 3}, "'completion' must be a string"),
    ({"instruction": "q", "output": ["a"]}, "'output' must be a string"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        "empty assistant turn",
    ),
    ({"messages": [{"role": "bot", "content": "q"}]}, "has role 'bot'"),
    ({"messages": [{"role": "user", "content": None}]}, "content must be a string"),
    ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path, tokenizer, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError) as info:
        load_examples(path, tokenizer, max_length=128)
    assert f"{path}:3:" in str(info.value)
    assert message in str(info.value)
    assert "--skip-bad-rows" in str(info.value)


def test_fully_truncated_answer_is_a_bad_row(tmp_path, tokenizer):
    long_prompt = {
        "messages": [
            {"role": "user", "content": "word " * 200},
            {"role": "assistant", "content": "answer"},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_prompt])
    with pytest.raises(DataError, match=r"d\.jsonl:2: the answer is cut off entirely"):
        load_examples(path, tokenizer, max_length=64)


def test_skip_bad_rows_counts_and_truncation_is_counted(tmp_path, tokenizer):
    long_answer = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "word " * 200},
        ]
    }
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "not json", "", {"prompt": 1}, long_answer])
    examples, report = load_examples(path, tokenizer, max_length=64, skip_bad_rows=True)
    assert report.rows == len(examples) == 2
    assert len(report.skipped) == 2 and ":2:" in report.skipped[0] and ":4:" in report.skipped[1]
    assert report.truncated == 1
    assert max(len(e.input_ids) for e in examples) == 64


def test_no_usable_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", ["{bad"])
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(path, tokenizer, max_length=64, skip_bad_rows=True)


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such data file"):
        load_examples(tmp_path / "nope.jsonl", tokenizer, max_length=64)


def test_split_and_collate(tokenizer):
    examples = [
        encode(
            tokenizer,
            [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i + 1)}],
            64,
            f"x:{i}",
        )
        for i in range(20)
    ]
    train, held = split_examples(examples, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18
    assert {e.where for e in train}.isdisjoint(e.where for e in held)
    assert split_examples(examples, 0.1, seed=3) == (train, held)  # deterministic
    batch = collate(train[:3], pad_id=0)
    width = max(len(e.input_ids) for e in train[:3])
    assert batch["input_ids"].shape == (3, width)
    for i, e in enumerate(train[:3]):
        n = len(e.input_ids)
        assert batch["attention_mask"][i].sum() == n
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
