"""Steps run in a process of their own: results, failures, and no orphan left behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from edgeft.errors import EdgeftError
from edgeft.isolate import in_child


def _crash() -> None:
    os._exit(3)


def test_result_and_peak_memory_come_back_and_a_crash_is_one_error():
    result, peak = in_child(max, 3, 7, what="adding")
    assert result == 7 and (peak is None or peak > 1)
    with pytest.raises(EdgeftError, match="crashing: the process died"):
        in_child(_crash, what="crashing")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_child_dies_with_a_killed_parent(tmp_path):
    """A parent killed outright (no cleanup of its own) takes its child with it."""
    pid_file = tmp_path / "child.pid"
    (tmp_path / "sleeper.py").write_text(
        "import os, pathlib, time\n\n"
        "def sleep(path):\n"
        "    pathlib.Path(path).write_text(str(os.getpid()))\n"
        "    time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                sys.path.insert(0, {str(tmp_path)!r})
                from sleeper import sleep
                from edgeft.isolate import in_child

                if __name__ == "__main__":
                    in_child(sleep, {str(pid_file)!r}, what="sleeping")
                """
            ),
        ]
    )
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child outlived its killed parent")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False
