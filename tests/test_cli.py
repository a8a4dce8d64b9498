"""The command line end to end on the tiny model."""

import json
import os
import subprocess
import sys

from conftest import write_jsonl

from edgeft.cli import main


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "edgeft.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_train_then_merge_from_the_cli(tiny_llama, facts_jsonl, tmp_path, capsys):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    code = main(
        [
            "-q",
            "train",
            "--base",
            str(tiny_llama),
            "--data",
            str(facts_jsonl),
            "--out",
            str(adapter),
            "--max-steps",
            "8",
            "--lr",
            "5e-3",
            "--rank",
            "4",
            "--max-length",
            "64",
            "--eval-fraction",
            "0.25",
        ]
    )
    assert code == 0
    assert "adapter written to" in capsys.readouterr().out
    code = main(["-q", "merge", "--adapter", str(adapter), "--out", str(merged)])
    assert code == 0
    assert "within tolerance" in capsys.readouterr().out
    record = json.loads((merged / "edgeft.json").read_text())
    assert record["results"]["within_tolerance"] is True
    assert record["settings"]["merge_base"] == "dequantized"

    # An existing output is never replaced silently.
    code = main(["-q", "merge", "--adapter", str(adapter), "--out", str(merged)])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["-q", "merge", "--adapter", str(adapter), "--out", str(merged), "--force"]) == 0

    # A scale toward the base: said in the summary line and the record; out of range refused.
    half = tmp_path / "half"
    assert main(["merge", "--adapter", str(adapter), "--out", str(half), "--scale", "0.5"]) == 0
    assert "at scale 0.5" in capsys.readouterr().out
    assert json.loads((half / "edgeft.json").read_text())["settings"]["scale"] == 0.5
    code = main(
        ["-q", "merge", "--adapter", str(adapter), "--out", str(tmp_path / "x"), "--scale", "2"]
    )
    err = capsys.readouterr().err
    assert code != 0 and "--scale must be in (0, 1]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_bad_jsonl_line_is_one_line_error_and_nonzero_exit(tiny_llama, tmp_path):
    good = {"prompt": "q", "completion": "a"}
    data = write_jsonl(tmp_path / "d.jsonl", [good, good, good, '{"prompt": "q", "completion":'])
    result = run_cli(
        "train", "--base", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "out")
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{data}:4: invalid JSON" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_bad_preserve_line_is_one_line_error(tiny_llama, facts_jsonl, tmp_path):
    preserve = write_jsonl(tmp_path / "general.jsonl", [{"prompt": "q", "completion": "a"}, "{"])
    result = run_cli(
        "train",
        "--base",
        str(tiny_llama),
        "--data",
        str(facts_jsonl),
        "--preserve",
        str(preserve),
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if f"{preserve}:2:" in line
    ], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    result = run_cli("train", "--data", "x.jsonl", "--out", "o", "--preserve-weight", "0")
    assert result.returncode == 2 and "--preserve-weight must be positive" in result.stderr


def test_verbose_shows_the_traceback(tmp_path):
    result = run_cli("--verbose", "merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "m"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_user_mistakes(tmp_path):
    result = run_cli("merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "m"))
    assert result.returncode == 2 and "has no edgeft.json" in result.stderr
    result = run_cli(
        "train",
        "--base",
        str(tmp_path / "missing"),
        "--data",
        "x.jsonl",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and "not found" in result.stderr
    result = run_cli("train", "--data", "x.jsonl", "--out", "o", "--rank", "0")
    assert result.returncode == 2 and "--rank must be positive" in result.stderr
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_help_lists_the_stages():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "merge", "demo"):
        assert command in result.stdout
    assert "--skip-bad-rows" in run_cli("train", "--help").stdout
