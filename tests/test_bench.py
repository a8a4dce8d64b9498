"""edgeft bench: the harness on tiny artifacts of every runtime, its statistics, budgets as an
exit code, remote runs through a transport, and the files it writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_TRAIN, facts_rows, tiny_model, write_jsonl
from numerics import FP16_ROUNDING, FP32_ORDER, assert_parity_within

from edgeft.bench.harness import BenchSettings, Budgets, bench
from edgeft.bench.schema import read_results
from edgeft.bench.stats import percentile, summary, token_percentiles
from edgeft.cli import EXIT_BUDGET, EXIT_USER_ERROR, main
from edgeft.errors import EdgeftError
from edgeft.parity import Parity, compare_logits, perplexity

# Small enough for seconds per artifact; two depths so the depth loop is exercised.
FAST = BenchSettings(
    threads=1, prompt_tokens=16, decode_tokens=4, depths=(0, 32), repeats=2, warmup=1
)
QUESTIONS = [
    {"question": "What temperature is chicken done at?", "answers": ["165"]},
    {"question": "How long do eggs boil?", "answers": ["minutes"]},
]


# --- statistics and metrics on known inputs ---------------------------------------------------


def test_percentiles_interpolate_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(list(range(1, 101)), 90) == pytest.approx(90.1)
    assert percentile([7.0], 99) == 7.0
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert token_percentiles([0.010, 0.020, 0.030]) == pytest.approx(
        {"p50": 20.0, "p90": 28.0, "p99": 29.8}
    )
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_kl_top1_and_perplexity_on_known_distributions():
    p = np.array([0.5, 0.25, 0.25])
    q = np.array([0.25, 0.5, 0.25])
    expected_kl = float(np.sum(p * np.log(p / q)))  # 0.25 * ln 2
    parity = compare_logits(np.log([p, p]), np.log([q, p]))
    assert parity.mean_kl == pytest.approx(expected_kl / 2, rel=1e-12)
    assert parity.top1_agreement == 0.5  # argmax 0 vs 1, then the same
    assert parity.positions == 2
    # Shifted logits are the same distribution: KL 0, whatever the offset.
    assert compare_logits(np.log([p]), np.log([p]) + 5.0).mean_kl == pytest.approx(0, abs=1e-15)
    # Uniform over 4 tokens: perplexity 4 whatever the targets.
    assert perplexity(np.zeros((3, 4)), [0, 1, 3]) == pytest.approx(4.0)


def test_top1_off_ties_forgives_only_near_ties():
    from edgeft.parity import top1_off_ties

    reference = np.array([[4.0, 3.99, 0.0], [4.0, 2.0, 0.0]])  # scale 4
    near_tie = np.array([[3.99, 4.0, 0.0], [4.0, 2.0, 0.0]])  # swaps the 0.01 tie
    real = np.array([[4.0, 3.99, 0.0], [2.0, 4.0, 0.0]])  # swaps a 2.0 gap
    assert compare_logits(reference, near_tie).top1_agreement == 0.5
    assert top1_off_ties(reference, near_tie, noise=2**-7) == 1.0  # tie: 2·4·2⁻⁷ = 0.0625
    assert top1_off_ties(reference, near_tie, noise=0.0) == 0.5
    assert top1_off_ties(reference, real, noise=2**-7) == 0.5


# --- the harness on tiny artifacts of each runtime -------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tiny_tokenizer_dir, tmp_path_factory):
    """One tiny checkpoint, exported to GGUF (f32) and ONNX (fp32); every artifact knows its
    checkpoint through its edgeft.json, which is how bench finds the reference."""
    from edgeft.export.gguf import export_gguf
    from edgeft.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("bench")
    checkpoint = tiny_model(
        "llama", tiny_tokenizer_dir, root / "merged", max_position_embeddings=64
    )
    export_gguf(checkpoint, root / "gguf", ["f32"], threads=1)
    export_onnx(checkpoint, root / "onnx", ["fp32"], threads=1)
    task = write_jsonl(root / "task.jsonl", QUESTIONS)
    return {
        "checkpoint": checkpoint,
        "gguf": root / "gguf" / "model-f32.gguf",
        "onnx": root / "onnx" / "fp32",
        "task": task,
    }


@pytest.fixture(scope="module")
def run(artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out") / "report"
    results = bench(
        [
            str(artifacts["checkpoint"]),
            str(artifacts["gguf"]),
            f"{artifacts['onnx']}@onnxruntime",
            str(artifacts["onnx"]),
        ],
        out,
        task_path=artifacts["task"],
        settings=FAST,
        log=lambda _: None,
    )
    return out, results


def _reference_logits(checkpoint: Path) -> np.ndarray:
    """The checkpoint's logits on the eval ids bench scores (the default text, cut to the
    64-token context less the free position a prompt needs)."""
    from edgeft.fidelity import default_eval_text
    from edgeft.runtimes import get_runtime

    session = get_runtime("torch").load(checkpoint, threads=1)
    try:
        ids = session.tokenize(default_eval_text())[: FAST.max_eval_tokens]
        return session.logits(ids[: session.n_ctx - 1])
    finally:
        session.close()


def test_every_runtime_gets_a_row_with_latency_and_accuracy(run, artifacts):
    out, results = run
    rows = {a["runtime"]: a for a in results["artifacts"]}
    assert set(rows) == {"torch", "llama.cpp", "onnxruntime", "onnxruntime-genai"}
    # The reference came from the exports' edgeft.json.
    assert [r["path"] for r in results["references"]] == [str(artifacts["checkpoint"].resolve())]
    for row in rows.values():
        assert row["status"] == "ok", row["error"]
        latency = row["latency"]
        assert latency["load_s"] > 0 and latency["peak_rss_mb"] > latency["base_rss_mb"] > 0
        assert (
            latency["ttft_ms"]["min"] <= latency["ttft_ms"]["median"] <= latency["ttft_ms"]["max"]
        )
        assert latency["prefill_tok_s"]["median"] > 0
        assert [d["depth"] for d in latency["decode"]] == [0, 32]
        for depth in latency["decode"]:
            ms = depth["token_ms"]
            assert 0 < ms["p50"] <= ms["p90"] <= ms["p99"]
            assert depth["tok_s"]["median"] > 0
        accuracy = row["accuracy"]
        assert accuracy["tokenizer_matches_reference"] is True
        assert accuracy["task"]["total"] == len(QUESTIONS)
        assert len(accuracy["task"]["replies"]) == len(QUESTIONS)
        assert row["size_bytes"] > 0 and len(row["sha256"]) == 64
    # Full-precision artifacts agree with the reference: fp32 everywhere, but llama.cpp keeps
    # its KV cache in F16 (the bounds: tests/numerics.py)
    reference = _reference_logits(artifacts["checkpoint"])
    reference_name = results["references"][0]["name"]
    for runtime, row in rows.items():
        vs = row["accuracy"]["vs"][reference_name]
        assert vs["positions"] == len(reference), (runtime, vs)
        bound = FP16_ROUNDING if runtime == "llama.cpp" else FP32_ORDER
        assert_parity_within(Parity(**vs), reference, bound)
    ppl = {r: row["accuracy"]["perplexity"] for r, row in rows.items()}
    assert max(ppl.values()) / min(ppl.values()) < 1.01
    assert results["passed"] is True  # no budgets set


def test_reports_are_written_and_parse(run):
    out, results = run
    assert read_results(out / "results.json")["artifacts"] == json.loads(
        json.dumps(results["artifacts"])
    )
    for name in ("report.md", "report.html"):
        assert (out / name).stat().st_size > 1000
    assert len(list((out / "plots").glob("*.png"))) == 4
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "01.log",
        "02.log",
        "03.log",
        "04.log",
    ]
    markdown = (out / "report.md").read_text()
    for row in results["artifacts"]:
        assert row["name"] in markdown
    assert not Path(str(out) + ".partial").exists()


def test_depths_beyond_the_context_are_skipped_with_a_note(artifacts, tmp_path):
    settings = BenchSettings(
        threads=1, prompt_tokens=16, decode_tokens=4, depths=(0, 16, 2048), repeats=1, warmup=0
    )
    # A parent holding 1 GB: the worker's peak RSS must be its own, not inherited through
    # fork (ru_maxrss survives exec on Linux).
    ballast = np.ones(125_000_000)
    results = bench([str(artifacts["gguf"])], tmp_path / "r", settings=settings, log=lambda _: None)
    del ballast
    row = results["artifacts"][0]
    assert row["latency"]["peak_rss_mb"] < 800
    assert [d["depth"] for d in row["latency"]["decode"]] == [0, 16]
    assert any("depth 2048 skipped" in note for note in row["notes"])


def test_a_broken_artifact_fails_its_row_not_the_run(artifacts, tmp_path):
    # A truncated GGUF is refused before anything runs, naming the file.
    data = artifacts["gguf"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(EdgeftError, match="cut.gguf: .*truncated"):
        bench([str(cut)], tmp_path / "r0", settings=FAST, log=lambda _: None)
    # An ONNX folder whose graph is garbage fails at load time, in its worker: its row says
    # why, the other artifacts are still measured, and the run does not pass.
    broken = tmp_path / "broken-onnx"
    shutil.copytree(artifacts["onnx"], broken)
    (broken / "model.onnx").write_bytes(b"not a protobuf" * 10)
    results = bench(
        [str(broken), str(artifacts["gguf"])],
        tmp_path / "r",
        references=[artifacts["checkpoint"]],
        settings=FAST,
        log=lambda _: None,
    )
    failed, ok = results["artifacts"]
    assert failed["status"] == "failed" and failed["error"] and failed["latency"] is None
    assert failed["passed"] is False
    assert ok["status"] == "ok"
    assert results["passed"] is False
    assert "broken-onnx" in (tmp_path / "r" / "report.md").read_text()
    assert "Traceback" in (tmp_path / "r" / "logs" / "01.log").read_text()


def test_budgets_gate_the_exit_code(artifacts, tmp_path, capsys):
    base = [str(artifacts["gguf"]), "--threads", "1", "--prompt-tokens", "16"]
    base += ["--decode-tokens", "4", "--depths", "0", "--repeats", "1", "--warmup", "0", "-q"]
    assert main(["bench", *base, "--out", str(tmp_path / "lax"), "--max-rss-mb", "1e6"]) == 0
    code = main(["bench", *base, "--out", str(tmp_path / "strict"), "--min-decode-tok-s", "1e9"])
    assert code == EXIT_BUDGET
    results = read_results(tmp_path / "strict" / "results.json")
    (budget,) = results["artifacts"][0]["budgets"]
    assert budget["name"] == "min_decode_tok_s" and budget["passed"] is False
    assert "missed a budget" in capsys.readouterr().err
    assert "✗" in (tmp_path / "strict" / "report.md").read_text()


def test_size_kl_and_task_budgets_gate_both_ways(artifacts, tmp_path, capsys):
    """``--max-size-mb``, ``--max-mean-kl`` and ``--min-task-accuracy`` pass when lax and fail,
    each named with its figure, when no file can meet them."""
    base = [str(artifacts["gguf"]), "--threads", "1", "--prompt-tokens", "16", "-q"]
    base += ["--decode-tokens", "4", "--depths", "0", "--repeats", "1", "--warmup", "0"]
    base += ["--task", str(artifacts["task"])]
    lax = ["--max-size-mb", "1e6", "--max-mean-kl", "1", "--min-task-accuracy", "0"]
    assert main(["bench", *base, "--out", str(tmp_path / "lax"), *lax]) == 0
    passed = read_results(tmp_path / "lax" / "results.json")["artifacts"][0]["budgets"]
    assert {b["name"] for b in passed if b["passed"]} == {
        "max_size_mb",
        "max_mean_kl",
        "min_task_accuracy",
    }
    strict = ["--max-size-mb", "1e-6", "--max-mean-kl", "-1", "--min-task-accuracy", "1.01"]
    code = main(["bench", *base, "--out", str(tmp_path / "strict"), *strict])
    assert code == EXIT_BUDGET
    row = read_results(tmp_path / "strict" / "results.json")["artifacts"][0]
    failed = {b["name"]: b for b in row["budgets"] if not b["passed"]}
    assert set(failed) == {"max_size_mb", "max_mean_kl", "min_task_accuracy"}
    assert failed["max_size_mb"]["value"] == row["size_bytes"] / 1e6
    assert failed["max_mean_kl"]["value"] >= 0 and failed["min_task_accuracy"]["value"] <= 1
    report = (tmp_path / "strict" / "report.md").read_text()
    assert "file size" in report and "task accuracy" in report


def test_as_trained_adds_the_adapter_as_a_reference(tiny_llama, tmp_path):
    """``--as-trained``: the adapter the reference was merged from, run as trained, is a
    second reference; an F32 file of the merged model is near both."""
    from edgeft.export.gguf import export_gguf
    from edgeft.merge import merge
    from edgeft.train import TrainSettings, train

    data = write_jsonl(tmp_path / "f.jsonl", facts_rows())
    settings = TrainSettings(method="lora", **{**FAST_TRAIN, "max_steps": 6})
    adapter = train(str(tiny_llama), data, tmp_path / "adapter", settings, progress=False).out
    merged = merge(adapter, tmp_path / "merged").out
    export_gguf(merged, tmp_path / "gguf", ["f32"], threads=1)
    results = bench(
        [str(tmp_path / "gguf" / "model-f32.gguf")],
        tmp_path / "out",
        as_trained=True,
        settings=FAST,
        log=lambda _: None,
    )
    assert [r["name"] for r in results["references"]] == ["merged", "as-trained"]
    assert results["references"][1]["path"] == str(adapter)
    vs = results["artifacts"][0]["accuracy"]["vs"]
    assert set(vs) == {"merged", "as-trained"}
    assert vs["merged"]["mean_kl"] < 1e-4 and vs["as-trained"]["mean_kl"] < 1e-4
    # a reference that was not merged from an adapter has no as-trained model to add
    with pytest.raises(EdgeftError, match="names no adapter"):
        bench(
            [str(tmp_path / "gguf" / "model-f32.gguf")],
            tmp_path / "o2",
            references=[tiny_llama],
            as_trained=True,
            settings=FAST,
            log=lambda _: None,
        )
    assert not (tmp_path / "o2").exists()


def test_compare_two_runs(run, tmp_path, capsys):
    out, results = run
    older = json.loads((out / "results.json").read_text())
    for row in older["artifacts"]:
        row["latency"]["decode"][0]["tok_s"]["median"] *= 2  # the new run is half as fast
    (tmp_path / "old.json").write_text(json.dumps(older))
    code = main(["bench", str(out / "results.json"), "--compare", str(tmp_path / "old.json")])
    assert code == 0
    text = capsys.readouterr().out
    assert "-50.0%" in text


def test_bad_input_is_one_clear_error(artifacts, tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"\x80\x02")
    code = main(["bench", str(tmp_path / "weights.bin"), "--out", str(tmp_path / "o")])
    assert code == EXIT_USER_ERROR
    assert "weights.bin: not an artifact edgeft can benchmark" in capsys.readouterr().err
    code = main(["bench", f"{artifacts['gguf']}@onnxruntime", "--out", str(tmp_path / "o")])
    assert code == EXIT_USER_ERROR
    assert "cannot run in onnxruntime" in capsys.readouterr().err
    code = main(["bench", str(artifacts["gguf"]), "--out", str(tmp_path / "o"), "--depths", "a"])
    assert code == EXIT_USER_ERROR
    existing = tmp_path / "exists"
    existing.mkdir()
    code = main(["bench", str(artifacts["gguf"]), "--out", str(existing)])
    assert code == EXIT_USER_ERROR
    assert "--force" in capsys.readouterr().err
    assert not any(existing.iterdir())


def test_device_profile_caps_threads_and_predicts(artifacts, tmp_path):
    results = bench(
        [str(artifacts["gguf"])],
        tmp_path / "r",
        device="raspberry-pi-5",
        settings=BenchSettings(
            threads=8, prompt_tokens=16, decode_tokens=4, depths=(0,), repeats=1, warmup=0
        ),
        budgets=Budgets(max_ttft_ms=1e9),  # a flag overrides the profile's budget
        log=lambda _: None,
    )
    device = results["device"]
    assert device["name"] == "raspberry-pi-5" and device["not_emulated"]
    assert results["settings"]["threads"] <= 2  # this machine's cores
    (decode,) = results["artifacts"][0]["latency"]["decode"]
    measured, predicted = decode["tok_s"]["median"], decode["predicted_tok_s"]
    ratio = 10.0 / results["machine"]["bandwidth_gbs"]  # the profile's bandwidth / host's
    assert predicted == pytest.approx(measured * ratio, rel=0.2)
    assert decode["roofline_tok_s"] > 0
    budgets = {b["name"]: b for b in results["artifacts"][0]["budgets"]}
    assert budgets["max_ttft_ms"]["limit"] == 1e9
    assert set(budgets) == {"max_rss_mb", "min_decode_tok_s", "max_ttft_ms"}


class LoopbackRunner:
    """ssh and scp to a 'device' that is this machine: ssh runs the command through sh, scp
    copies. What the transport sends is what a real sshd would run."""

    def __init__(self):
        self.calls = []

    def __call__(self, argv, *, capture_output, text, timeout=None):
        self.calls.append(list(argv))
        if argv[0] == "ssh":
            return subprocess.run(
                ["sh", "-c", argv[-1]], capture_output=True, text=True, timeout=timeout
            )
        source, dest = (a.split(":", 1)[-1] for a in argv[-2:])
        if Path(source).is_dir():
            shutil.copytree(source, dest)
        else:
            shutil.copy(source, dest)
        return subprocess.CompletedProcess(argv, 0, "", "")


def test_remote_run_measures_on_the_device_and_kl_here(artifacts, tmp_path, monkeypatch):
    from edgeft.devices import remote

    runner = LoopbackRunner()
    monkeypatch.setattr(
        remote, "parse_remote", lambda spec: remote.SshTransport("me@phone", runner=runner)
    )
    python = sys.executable
    monkeypatch.setattr(
        remote, "run_remote", _with_python(remote.run_remote, python, str(tmp_path / "w" / "x"))
    )
    results = bench(
        [str(artifacts["gguf"])],
        tmp_path / "r",
        remote="ssh:me@phone",
        task_path=artifacts["task"],
        settings=FAST,
        log=lambda _: None,
    )
    row = results["artifacts"][0]
    assert row["status"] == "ok", row["error"]
    assert any("worker" in arg for call in runner.calls for arg in call)
    assert row["latency"]["decode"][0]["tok_s"]["median"] > 0
    assert row["accuracy"]["vs"]  # measured on this machine against the reference logits
    assert row["accuracy"]["task"]["total"] == len(QUESTIONS)
    assert any("measured on ssh" in note for note in row["notes"])
    assert not (tmp_path / "w" / "x").exists()  # the device's workdir is removed


def _with_python(run_remote, python, workdir):
    def wrapped(transport, artifact, spec, **kw):
        return run_remote(transport, artifact, spec, python=python, workdir=workdir, **kw)

    return wrapped


def test_settings_are_validated():
    with pytest.raises(EdgeftError, match="--repeats"):
        BenchSettings(repeats=0)
    with pytest.raises(EdgeftError, match="--depths"):
        BenchSettings(depths=(-1,))
    with pytest.raises(EdgeftError, match="--warmup"):
        BenchSettings(warmup=-1)


def test_further_tasks_texts_and_question_context_through_the_cli(artifacts, tmp_path):
    """``--task`` twice and ``--text``: the first task gates budgets, the others and the texts
    are reported by file name; a question's context turns reach every runtime's prompt."""
    context = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}]
    prompted = write_jsonl(
        tmp_path / "prompted.jsonl", [{**q, "context": context} for q in QUESTIONS]
    )
    text = tmp_path / "general.txt"
    text.write_text("Rivers carry water from the hills down to the sea. " * 8, encoding="utf-8")
    args = ["bench", str(artifacts["checkpoint"]), str(artifacts["gguf"]), str(artifacts["onnx"])]
    args += ["--threads", "1", "--prompt-tokens", "16", "--decode-tokens", "2", "--depths", "0"]
    args += ["--repeats", "1", "--warmup", "0", "-q", "--out", str(tmp_path / "out")]
    args += ["--task", str(artifacts["task"]), "--task", str(prompted), "--text", str(text)]
    assert main(args) == 0
    results = read_results(tmp_path / "out" / "results.json")
    assert set(results["settings"]["tasks"]) == {"prompted"}
    for row in results["artifacts"]:
        plain, more = row["accuracy"]["task"], row["accuracy"]["tasks"]["prompted"]
        assert plain["total"] == more["total"] == len(QUESTIONS)
        assert more["prompt_tokens"] > plain["prompt_tokens"] > 0, row["runtime"]
        assert more["ttft_ms"] > 0 and plain["ttft_ms"] > 0
        assert all(r["prompt_tokens"] > 0 for r in more["replies"])
        general = row["accuracy"]["texts"]["general"]
        assert general["tokens"] > 10 and general["perplexity"] > 1, row["runtime"]
