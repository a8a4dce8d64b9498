"""Running the bench worker on a real device over adb or ssh.

A transport copies files and runs commands; :func:`run_remote` uses one to push an artifact
and a bench spec, run ``python3 -m edgeft.bench.worker SPEC RESULT`` on the device and pull
the result back. Every remote command is an argv list joined with :func:`shlex.join`, so no
user string reaches a remote shell unquoted.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgeft.errors import EdgeftError

Runner = Callable[..., subprocess.CompletedProcess]

# Remote paths go to scp (whose legacy protocol hands them to a remote shell) and to rm -rf:
# allow only plain absolute paths.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]*")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]")


class Transport(Protocol):
    """A way to reach one device: copy files both ways and run a command."""

    name: str  # the device as the user wrote it: "adb:SERIAL", "ssh:user@host"
    default_workdir: str

    def push(self, local: Path, remote: str) -> None: ...

    def pull(self, remote: str, local: Path) -> None: ...

    def run(self, argv: list[str], *, timeout: float | None = None) -> str:
        """Run ``argv`` on the device and return its stdout.

        Raises:
            EdgeftError: non-zero exit (naming the command and the last line of stderr).
        """
        ...


def _call(runner: Runner, argv: list[str], *, missing: str, timeout: float | None = None) -> str:
    """Run a local command (adb, ssh, scp); turn every failure into one EdgeftError line."""
    try:
        result = runner(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise EdgeftError(f"{argv[0]} not found on PATH; {missing}") from None
    except subprocess.TimeoutExpired:
        raise EdgeftError(f"timed out after {timeout:g} s: {shlex.join(argv)}") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr or "").splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "no error output"
        raise EdgeftError(f"exit status {result.returncode}: {shlex.join(argv)}: {last}")
    return result.stdout or ""


def _check_remote_path(path: str) -> str:
    if not _SAFE_PATH.fullmatch(path) or ".." in path.split("/"):
        raise EdgeftError(
            f"remote path {path!r} must be absolute and use only letters, digits and . _ + - /"
        )
    return path


class AdbTransport:
    """An Android device reached with ``adb -s SERIAL``."""

    default_workdir = "/data/local/tmp/edgeft-bench"
    _missing = "install Android platform-tools"

    def __init__(self, serial: str, adb: str = "adb", runner: Runner = subprocess.run) -> None:
        self.serial = serial
        self.adb = adb
        self.runner = runner
        self.name = f"adb:{serial}"

    @classmethod
    def from_spec(cls, rest: str, runner: Runner = subprocess.run) -> AdbTransport:
        """``rest`` is what follows ``adb:``: a serial as ``adb devices`` lists it."""
        if not rest or rest.startswith("-") or any(c.isspace() for c in rest):
            raise ValueError(rest)
        return cls(rest, runner=runner)

    def _adb(self, *args: str, timeout: float | None = None) -> str:
        argv = [self.adb, "-s", self.serial, *args]
        return _call(self.runner, argv, missing=self._missing, timeout=timeout)

    def push(self, local: Path, remote: str) -> None:
        self._adb("push", str(local), remote)

    def pull(self, remote: str, local: Path) -> None:
        self._adb("pull", remote, str(local))

    def run(self, argv: list[str], *, timeout: float | None = None) -> str:
        # adb joins its arguments into one device shell command line: pass it pre-quoted.
        # adb reports the command's exit status on Android 7+ (shell protocol); older devices
        # always exit 0, and a failed worker then shows as a failed pull of its result.
        return self._adb("shell", shlex.join(argv), timeout=timeout)


class SshTransport:
    """A Linux device reached with ``ssh``/``scp`` (key-based login: BatchMode, no prompts)."""

    default_workdir = "/tmp/edgeft-bench"
    _missing = "install an OpenSSH client"

    def __init__(
        self,
        target: str,
        port: int | None = None,
        ssh: str = "ssh",
        scp: str = "scp",
        runner: Runner = subprocess.run,
    ) -> None:
        self.target = target
        self.port = port
        self.ssh = ssh
        self.scp = scp
        self.runner = runner
        self.name = f"ssh:{target}" + (f":{port}" if port is not None else "")

    # [user@]host[:PORT]; neither part may start with "-" (ssh would read an option).
    _SPEC = re.compile(
        r"(?:([A-Za-z0-9._][A-Za-z0-9._-]*)@)?([A-Za-z0-9][A-Za-z0-9.-]*)(?::(\d+))?"
    )

    @classmethod
    def from_spec(cls, rest: str, runner: Runner = subprocess.run) -> SshTransport:
        """``rest`` is what follows ``ssh:``: ``user@host`` or ``user@host:PORT``."""
        match = cls._SPEC.fullmatch(rest)
        if match is None:
            raise ValueError(rest)
        user, host, port = match.groups()
        if port is not None and not 0 < int(port) < 65536:
            raise ValueError(rest)
        target = f"{user}@{host}" if user else host
        return cls(target, port=int(port) if port else None, runner=runner)

    def _options(self, port_flag: str) -> list[str]:
        port = [port_flag, str(self.port)] if self.port is not None else []
        return [*port, "-o", "BatchMode=yes"]

    def _scp(self, source: str, dest: str) -> None:
        argv = [self.scp, *self._options("-P"), "-r", source, dest]
        _call(self.runner, argv, missing=self._missing)

    def push(self, local: Path, remote: str) -> None:
        # An absolute local path never reads as host:path to scp.
        self._scp(str(Path(local).absolute()), f"{self.target}:{_check_remote_path(remote)}")

    def pull(self, remote: str, local: Path) -> None:
        self._scp(f"{self.target}:{_check_remote_path(remote)}", str(Path(local).absolute()))

    def run(self, argv: list[str], *, timeout: float | None = None) -> str:
        # ssh joins its arguments into one remote shell command line: pass it pre-quoted.
        command = [self.ssh, *self._options("-p"), self.target, shlex.join(argv)]
        return _call(self.runner, command, missing=self._missing, timeout=timeout)


# kind → implementation; each parses the part of "--remote KIND:..." after the colon.
TRANSPORTS: dict[str, type[AdbTransport] | type[SshTransport]] = {
    "adb": AdbTransport,
    "ssh": SshTransport,
}

_FORMS = "adb:SERIAL, ssh:user@host or ssh:user@host:PORT"


def parse_remote(spec: str, runner: Runner = subprocess.run) -> Transport:
    """The transport a ``--remote`` value names.

    Raises:
        EdgeftError: an unknown kind or a malformed value (the message gives the accepted
            forms).
    """
    kind, sep, rest = spec.partition(":")
    transport = TRANSPORTS.get(kind)
    if not sep or transport is None:
        raise EdgeftError(f"unknown remote {spec!r}; use {_FORMS}")
    try:
        return transport.from_spec(rest, runner=runner)
    except ValueError:
        raise EdgeftError(f"malformed remote {spec!r}; use {_FORMS}") from None


def run_remote(
    transport: Transport,
    artifact: Path,
    spec: dict,
    *,
    workdir: str | None = None,
    python: str = "python3",
    keep: bool = False,
    timeout: float | None = None,
) -> dict:
    """Bench one artifact on a device with the worker installed there.

    Pushes ``artifact`` (a file or a directory) and ``spec`` (its ``"artifact"`` rewritten to
    the remote path) into a fresh ``workdir``, runs ``python -m edgeft.bench.worker SPEC
    RESULT``, pulls the result and, unless ``keep``, removes ``workdir``.

    Args:
        transport: the device (:func:`parse_remote`).
        artifact: the local model file or directory.
        spec: the worker's input; JSON-serializable.
        workdir: absolute remote directory (default: the transport's ``default_workdir``).
        python: the device's Python, which must have edgeft installed.
        keep: leave ``workdir`` on the device (to inspect it).
        timeout: seconds the worker may run.

    Returns:
        The worker's result object.

    Raises:
        EdgeftError: a failed remote step (naming the command), or a result that is not a
            JSON object (naming the device).
    """
    artifact = Path(artifact)
    if not artifact.exists():
        raise EdgeftError(f"{artifact}: no such artifact to push")
    workdir = _check_remote_path(workdir or transport.default_workdir)
    if workdir.rstrip("/").count("/") < 2:
        raise EdgeftError(
            f"remote workdir {workdir!r} is removed after the run; use a dedicated directory "
            "at least two levels deep, e.g. /tmp/edgeft-bench"
        )
    # The name is kept (it tells the worker the quantization and format), made shell- and
    # scp-safe.
    remote_artifact = posixpath.join(workdir, _UNSAFE_NAME_CHARS.sub("_", artifact.name))
    remote_spec = posixpath.join(workdir, "spec.json")
    remote_result = posixpath.join(workdir, "result.json")

    # A directory kept from an earlier run would make "push DIR" nest inside the old copy.
    transport.run(["rm", "-rf", workdir])
    transport.run(["mkdir", "-p", workdir])
    try:
        with tempfile.TemporaryDirectory(prefix="edgeft-remote-") as tmp:
            transport.push(artifact, remote_artifact)
            local_spec = Path(tmp) / "spec.json"
            local_spec.write_text(
                json.dumps({**spec, "artifact": remote_artifact}, indent=2), encoding="utf-8"
            )
            transport.push(local_spec, remote_spec)
            transport.run(
                [python, "-m", "edgeft.bench.worker", remote_spec, remote_result],
                timeout=timeout,
            )
            local_result = Path(tmp) / "result.json"
            transport.pull(remote_result, local_result)
            try:
                result = json.loads(local_result.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise EdgeftError(
                    f"{transport.name}: the worker's result is not readable JSON ({exc})"
                ) from None
        if not isinstance(result, dict):
            raise EdgeftError(
                f"{transport.name}: the worker's result is a JSON {type(result).__name__}, "
                "not an object"
            )
    except BaseException:
        if not keep:
            with contextlib.suppress(EdgeftError):  # the first error is the one to report
                transport.run(["rm", "-rf", workdir])
        raise
    if not keep:
        transport.run(["rm", "-rf", workdir])
    return result
