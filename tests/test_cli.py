"""The command line end to end on the tiny model."""

import json
import os
import subprocess
import sys

import pytest
from conftest import write_jsonl

from edgeft.cli import main
from edgeft.errors import EdgeftError
from edgeft.options import settings_from


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


# -- options generated from the settings dataclasses ------------------------------------------

# (command words, required arguments, settings class, fields it takes, defaults that differ)
SETTINGS_COMMANDS = [
    (("train",), ["--data", "d.jsonl", "--out", "o"], "TrainSettings", None, {}),
    (("export", "onnx"), ["--model", "m", "--out", "o"], "QuantSettings", None, {}),
    (("bench",), ["a.gguf", "--out", "o"], "BenchSettings", None, {}),
    (
        ("recommend",),
        ["--model", "m", "--out", "o"],
        "BenchSettings",
        ("threads", "depths", "repeats"),
        {"depths": (0, 512)},
    ),
]


def _settings_class(name):
    from edgeft.bench.harness import BenchSettings
    from edgeft.export.onnx import QuantSettings
    from edgeft.train import TrainSettings

    return {c.__name__: c for c in (TrainSettings, QuantSettings, BenchSettings)}[name]


def _leaf_parsers(parser, words=()):
    """Every (command words, parser) that parses arguments, subcommands included."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield words, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaf_parsers(child, (*words, name))


def _as_parsed(value):
    """A field default as the parser holds it: lists and name=value pairs as text."""
    if isinstance(value, tuple | list):
        return ",".join("=".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return value


@pytest.mark.parametrize(("words", "required", "cls", "only", "changed"), SETTINGS_COMMANDS)
def test_every_setting_is_an_option_with_its_default(words, required, cls, only, changed):
    import dataclasses

    from edgeft.cli import build_parser

    cls = _settings_class(cls)
    parser = dict(_leaf_parsers(build_parser()))[words]
    actions = {a.dest: a for a in parser._actions}
    fields = [f for f in dataclasses.fields(cls) if only is None or f.name in only]
    assert fields and (only is None or len(fields) == len(only))
    for f in fields:
        action = actions[f.name]
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        assert flag in action.option_strings, (f.name, action.option_strings)
        assert action.help, f"{flag} has no help text"
        assert action.default == _as_parsed(changed.get(f.name, getattr(cls(), f.name))), flag
    args = build_parser().parse_args([*words, *required])
    assert settings_from(args, cls) == cls(**changed)


def test_flags_keep_their_names_and_meaning():
    from edgeft.bench.harness import BenchSettings
    from edgeft.cli import build_parser
    from edgeft.export.onnx import QuantSettings
    from edgeft.train import TrainSettings

    parse = build_parser().parse_args
    train = ["train", "--data", "d.jsonl", "--out", "o", "--lr", "1e-3", "--no-double-quant"]
    train += ["--no-group-by-length", "--gradient-checkpointing", "--target-modules", "q,v"]
    assert settings_from(parse(train), TrainSettings) == TrainSettings(
        learning_rate=1e-3,
        double_quant=False,
        group_by_length=False,
        gradient_checkpointing=True,
        target_modules=["q", "v"],
    )
    onnx = ["export", "onnx", "--model", "m", "--out", "o", "--no-symmetric", "--int8-modules"]
    onnx += ["", "--module-blocks", "up_proj=128,lm_head=64", "--embeddings", "int8"]
    assert settings_from(parse(onnx), QuantSettings) == QuantSettings(
        symmetric=False,
        int8_modules=(),
        module_blocks=(("up_proj", 128), ("lm_head", 64)),
        embeddings="int8",
    )
    bench = ["bench", "a.gguf", "--timeout", "5", "--depths", "0, 64", "--threads", "1"]
    assert settings_from(parse(bench), BenchSettings) == BenchSettings(
        timeout_s=5.0, depths=(0, 64), threads=1
    )
    for argv, cls, message in (
        ([*bench, "--depths", "0,a"], BenchSettings, "--depths: expected comma-separated integers"),
        ([*onnx, "--module-blocks", "up_proj"], QuantSettings, "'up_proj' is not module=size"),
    ):
        with pytest.raises(EdgeftError, match=message):
            settings_from(parse(argv), cls)


def test_help_shows_every_default():
    import argparse

    from edgeft.cli import build_parser
    from edgeft.options import HelpFormatter

    parsers = dict(_leaf_parsers(build_parser()))
    assert {("train",), ("export", "onnx"), ("bench",), ("recommend",)} <= set(parsers)
    for words, parser in parsers.items():
        formatter = HelpFormatter(prog="edgeft")
        for action in parser._actions:
            shown = action.default not in (None, argparse.SUPPRESS, [])
            if action.option_strings and shown and action.nargs != 0:
                text = formatter._get_help_string(action)
                assert "default" in text, (words, action.option_strings)
    expected = {
        ("train",): {"--rank": "16", "--lr": "0.0002", "--double-quant": "True"},
        ("export", "onnx"): {"--block-size": "32", "--threads": "2", "--symmetric": "True"},
        ("bench",): {"--depths": "0,512,2048", "--timeout": "3600.0"},
        ("recommend",): {"--depths": "0,512", "--threads": "2"},
        ("merge",): {"--dtype": "fp32"},
    }
    for words, defaults in expected.items():
        for flag, value in defaults.items():
            assert f"(default: {value})" in _help_of(parsers[words], flag), (words, flag)


def _help_of(parser, flag: str) -> str:
    """The lines ``--help`` prints for ``flag``, joined into one."""
    import re

    blocks = re.split(r"\n(?=  -)", parser.format_help())
    block = next(b for b in blocks if re.match(rf"\s*(-\w, )?{re.escape(flag)}[ ,\n]", b))
    return " ".join(block.split())


def test_threads_default_is_one_constant():
    import inspect
    import re
    from pathlib import Path

    from edgeft.bench.harness import BenchSettings
    from edgeft.cli import build_parser
    from edgeft.export.gguf import export_gguf, export_gguf_lora
    from edgeft.export.onnx import export_onnx
    from edgeft.options import DEFAULT_THREADS
    from edgeft.package import package, verify

    with_threads = 0
    for words, parser in _leaf_parsers(build_parser()):
        for action in parser._actions:
            if "--threads" in action.option_strings:
                assert action.default == DEFAULT_THREADS, words
                with_threads += 1
    assert with_threads >= 7  # export gguf, gguf-lora, onnx; bench, recommend, package, verify
    assert BenchSettings().threads == DEFAULT_THREADS
    for function in (export_gguf, export_gguf_lora, export_onnx, package, verify):
        default = inspect.signature(function).parameters["threads"].default
        assert default == DEFAULT_THREADS, function.__name__
    # No other default written as a number: every one names the constant.
    root = Path(__file__).resolve().parents[1]
    literal = re.compile(r"threads: int = \d|\"--threads\".*default=\d|threads = .* else \d")
    for folder in ("edgeft", "export", "runtimes", "devices"):
        for path in (root / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                assert not literal.search(line), f"{path.relative_to(root)}:{number}: {line}"
