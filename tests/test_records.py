"""edgeft.json records: one typed record per stage, one way in and one way out."""

import json

import pytest

from edgeft.errors import ModelError
from edgeft.provenance import (
    BaseRecord,
    MergeRecord,
    find_record,
    make_record,
    read_record,
    record_dict,
    write_record,
)

MERGE_INPUTS = {
    "adapter": {"path": "/runs/adapter", "sha256": "a" * 64},
    "base": {"name": "SmolLM2-135M", "path": "/models/base", "weights_sha256": "b" * 64},
    "train": {"method": "qlora", "settings": {"rank": 8}, "results": {}},
}
MERGE_SETTINGS = {"merge_base": "dequantized", "dtype": "fp32", "scale": 0.5, "modules": 14}


def _merge_record():
    return make_record("merge", inputs=MERGE_INPUTS, settings=MERGE_SETTINGS, results={})


def test_a_record_reads_back_as_written(tmp_path):
    record = _merge_record()
    write_record(tmp_path, record)
    back = read_record(tmp_path, "merge")
    assert isinstance(back, MergeRecord)
    assert back.inputs.base.weights_sha256 == "b" * 64 and back.settings.scale == 0.5
    # parts beyond the typed ones are kept, not dropped
    assert back.settings.modules == 14 and back.inputs.train.settings == {"rank": 8}
    assert record_dict(back) == json.loads((tmp_path / "edgeft.json").read_text())


def test_a_stage_cannot_write_an_incomplete_record():
    inputs = {**MERGE_INPUTS, "adapter": {"path": "/runs/adapter"}}
    with pytest.raises(ModelError, match=r"inputs\.adapter\.sha256: field required"):
        make_record("merge", inputs=inputs, settings=MERGE_SETTINGS, results={})


def _written(tmp_path, change) -> dict:
    data = record_dict(_merge_record())
    change(data)
    (tmp_path / "edgeft.json").write_text(json.dumps(data))
    return data


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["inputs"].pop("base"), r"incomplete merge record \(inputs\.base: field"),
        (lambda d: d["settings"].update(merge_base="4bit"), r"settings\.merge_base"),
        (lambda d: d.update(schema_version=7), r"newer edgeft \(record schema 7"),
        (lambda d: d.update(stage="quantize"), "stage 'quantize' is not one edgeft writes"),
        (lambda d: d.pop("schema_version"), r"schema_version: field required"),
    ],
)
def test_a_record_is_read_whole_or_refused_in_one_line(tmp_path, change, message):
    _written(tmp_path, change)
    for read in (read_record, find_record):
        with pytest.raises(ModelError, match=message) as info:
            read(tmp_path)
        assert str(tmp_path / "edgeft.json") in str(info.value)
        assert "\n" not in str(info.value)


def test_a_merge_record_from_before_scale_reads_as_a_whole_merge(tmp_path):
    _written(tmp_path, lambda d: d["settings"].pop("scale"))
    assert read_record(tmp_path, "merge").settings.scale == 1.0


def test_unreadable_and_missing_records(tmp_path):
    assert find_record(tmp_path) is None
    with pytest.raises(ModelError, match="has no edgeft.json; pass a directory written by edgeft"):
        read_record(tmp_path, "train")
    (tmp_path / "edgeft.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read provenance record"):
        find_record(tmp_path)
    _written(tmp_path, lambda d: None)
    with pytest.raises(ModelError, match="expected the output of 'edgeft export gguf'"):
        find_record(tmp_path, "export-gguf")


def test_the_embedded_base_record_says_where_its_weights_came_from(tmp_path):
    record = make_record(
        "base",
        inputs={"gguf": "/x/model.gguf", "gguf_sha256": "c" * 64},
        settings={"dtype": "float32"},
        results={},
    )
    write_record(tmp_path, record)
    assert isinstance(find_record(tmp_path), BaseRecord)


# --- bench results ---------------------------------------------------------------------------


def test_every_committed_bench_results_file_reads_under_the_schema():
    from pathlib import Path

    from edgeft.bench.schema import SCHEMA, read_results

    files = [
        path
        for path in sorted((Path(__file__).parent.parent / "benchmarks" / "results").glob("*.json"))
        if json.loads(path.read_text()).get("schema") == SCHEMA
    ]
    assert len(files) >= 3
    for path in files:
        assert read_results(path)["artifacts"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["artifacts"][0]["latency"].update(tok_s=1.0), r"latency\.tok_s: extra"),
        (lambda r: r["artifacts"][1].pop("sha256"), r"artifacts\.1\.sha256: field required"),
        (lambda r: r["artifacts"][0].update(status="skipped"), r"artifacts\.0\.status"),
        (lambda r: r["settings"].update(threads="two"), r"settings\.threads"),
    ],
)
def test_a_bench_results_file_is_the_documented_schema_or_refused(tmp_path, change, message):
    """What the harness writes and what a reader accepts are the schema's models: an
    undocumented or missing part is refused in one line naming it, on writing as on reading."""
    from edgeft.bench.schema import example_results, read_results, write_results
    from edgeft.errors import EdgeftError

    results = example_results()
    write_results(tmp_path / "good.json", results)
    assert read_results(tmp_path / "good.json") == json.loads(json.dumps(results))
    change(results)
    with pytest.raises(EdgeftError, match=message):
        write_results(tmp_path / "bad.json", results)
    assert not (tmp_path / "bad.json").exists()
    (tmp_path / "bad.json").write_text(json.dumps(results))
    with pytest.raises(EdgeftError, match=message) as info:
        read_results(tmp_path / "bad.json")
    assert str(tmp_path / "bad.json") in str(info.value) and "\n" not in str(info.value)
