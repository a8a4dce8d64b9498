"""Device profiles: what a target phone, board or laptop offers an LLM, as data.

Each shipped profile is one TOML file under ``profiles/`` (its file name is the profile name);
a user passes the path of their own file in the same format. Figures are SI units:
``ram_gb`` and ``app_memory_gb`` in 10**9 bytes, ``memory_bandwidth_gbs`` in 10**9 bytes/s.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from edgeft.errors import EdgeftError
from edgeft.runtimes import RUNTIMES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser under its PyPI name.
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]  # _parse says what to install

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

Kind = Literal["phone", "sbc", "laptop", "embedded"]


@dataclass(frozen=True)
class Budgets:
    """Default pass/fail limits for an interactive assistant on the device (None: no limit)."""

    max_rss_mb: float | None = None
    min_decode_tok_s: float | None = None
    max_ttft_ms: float | None = None


@dataclass(frozen=True)
class Profile:
    """One device: its hardware figures, usable runtimes and default budgets."""

    name: str
    title: str
    kind: Kind
    soc: str
    cpu: str
    cores: int
    threads: int  # threads an LLM decode should use (the big/performance cores)
    ram_gb: float
    app_memory_gb: float  # what one app may realistically use before the OS kills it
    memory_bandwidth_gbs: float  # CPU-achievable, not the datasheet peak
    os: str
    runtimes: tuple[str, ...]
    budgets: Budgets
    notes: str | None = None


_SUFFIX = ".toml"

# key → (expected type name, check); the order is the order errors and renders follow.
_STR = ("string", lambda v: isinstance(v, str) and v.strip() != "")
_INT = ("positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0)
_NUM = (
    "positive number",
    lambda v: (
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    ),
)
_KIND = (" | ".join(get_args(Kind)), lambda v: v in get_args(Kind))
_RUNTIMES = (
    "non-empty list of runtime names",
    lambda v: isinstance(v, list) and v != [] and all(isinstance(r, str) for r in v),
)
_KEYS = {
    "title": _STR,
    "kind": _KIND,
    "soc": _STR,
    "cpu": _STR,
    "cores": _INT,
    "threads": _INT,
    "ram_gb": _NUM,
    "app_memory_gb": _NUM,
    "memory_bandwidth_gbs": _NUM,
    "os": _STR,
    "runtimes": _RUNTIMES,
}
_OPTIONAL_KEYS = {"notes": _STR}
_BUDGET_KEYS = ("max_rss_mb", "min_decode_tok_s", "max_ttft_ms")


def _profile_files() -> dict[str, Traversable]:
    folder = resources.files(__name__) / "profiles"
    return {
        f.name[: -len(_SUFFIX)]: f
        for f in folder.iterdir()
        if f.name.endswith(_SUFFIX) and f.is_file()
    }


def _parse(text: str, name: str, where: str) -> Profile:
    if tomllib is None:
        raise EdgeftError("reading device profiles on Python 3.10 needs: pip install tomli")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgeftError(f"{where}: not valid TOML ({exc})") from None
    known = {*_KEYS, *_OPTIONAL_KEYS, "budgets"}
    for key in data:
        if key not in known:
            raise EdgeftError(
                f"{where}: unknown key {key!r}; expected keys: {', '.join(sorted(known))}"
            )
    for key, (expected, ok) in (_KEYS | _OPTIONAL_KEYS).items():
        if key not in data:
            if key in _OPTIONAL_KEYS:
                continue
            raise EdgeftError(f"{where}: missing key {key!r} ({expected}); add it to the file")
        if not ok(data[key]):
            raise EdgeftError(f"{where}: key {key!r} must be a {expected}, got {data[key]!r}")
    for runtime in data["runtimes"]:
        if runtime not in RUNTIMES:
            raise EdgeftError(
                f"{where}: key 'runtimes' has unknown runtime {runtime!r}; "
                f"choose from: {', '.join(sorted(RUNTIMES))}"
            )
    if data["threads"] > data["cores"]:
        raise EdgeftError(
            f"{where}: key 'threads' ({data['threads']}) is more than 'cores' ({data['cores']})"
        )
    if data["app_memory_gb"] > data["ram_gb"]:
        raise EdgeftError(
            f"{where}: key 'app_memory_gb' ({data['app_memory_gb']}) is more than "
            f"'ram_gb' ({data['ram_gb']})"
        )
    budgets = data.get("budgets", {})
    if not isinstance(budgets, dict):
        raise EdgeftError(f"{where}: key 'budgets' must be a table, got {budgets!r}")
    for key, value in budgets.items():
        if key not in _BUDGET_KEYS:
            raise EdgeftError(
                f"{where}: unknown key 'budgets.{key}'; expected: {', '.join(_BUDGET_KEYS)}"
            )
        if not _NUM[1](value):
            raise EdgeftError(f"{where}: key 'budgets.{key}' must be a {_NUM[0]}, got {value!r}")
    return Profile(
        name=name,
        title=data["title"],
        kind=data["kind"],
        soc=data["soc"],
        cpu=data["cpu"],
        cores=data["cores"],
        threads=data["threads"],
        ram_gb=float(data["ram_gb"]),
        app_memory_gb=float(data["app_memory_gb"]),
        memory_bandwidth_gbs=float(data["memory_bandwidth_gbs"]),
        os=data["os"],
        runtimes=tuple(data["runtimes"]),
        budgets=Budgets(**{k: float(v) for k, v in budgets.items()}),
        notes=data.get("notes"),
    )


def list_profiles() -> list[Profile]:
    """The shipped profiles, sorted by name."""
    files = _profile_files()
    return [
        _parse(files[name].read_text(encoding="utf-8"), name, f"profiles/{name}{_SUFFIX}")
        for name in sorted(files)
    ]


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file; its name is the file name without ``.toml``.

    Raises:
        EdgeftError: unreadable file, invalid TOML, or a missing/wrong key (named).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeftError(f"{path}: no such device profile file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeftError(f"{path}: cannot read device profile ({exc})") from None
    return _parse(text, path.stem, str(path))


def get_profile(spec: str) -> Profile:
    """A shipped profile by name, or a user profile by the path of its ``.toml`` file.

    Raises:
        EdgeftError: unknown name (the message lists the shipped ones), or a bad file.
    """
    files = _profile_files()
    if spec in files:
        return _parse(files[spec].read_text(encoding="utf-8"), spec, f"profiles/{spec}{_SUFFIX}")
    if spec.endswith(_SUFFIX) or os.sep in spec or "/" in spec or Path(spec).is_file():
        return load_profile(spec)
    raise EdgeftError(
        f"unknown device {spec!r}; choose from: {', '.join(sorted(files))} or pass a .toml file"
    )


def _g(value: float) -> str:
    return f"{value:g}"


def render_list(profiles: list[Profile] | None = None) -> str:
    """One aligned line per profile: name, title, RAM, bandwidth, runtimes."""
    profiles = list_profiles() if profiles is None else profiles
    rows = [
        (
            p.name,
            p.title,
            f"{_g(p.ram_gb)} GB RAM",
            f"{_g(p.memory_bandwidth_gbs)} GB/s",
            ", ".join(p.runtimes),
        )
        for p in profiles
    ]
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(
            [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2])]
            + [row[3].rjust(widths[3]), row[4]]
        )
        for row in rows
    )


def render_profile(profile: Profile) -> str:
    """Every field and budget of ``profile``, one per line."""
    p = profile
    budgets = p.budgets
    lines = [
        ("kind", p.kind),
        ("soc", p.soc),
        ("cpu", p.cpu),
        ("cores", f"{p.cores} ({p.threads} used for decode)"),
        ("ram", f"{_g(p.ram_gb)} GB ({_g(p.app_memory_gb)} GB usable by one app)"),
        ("bandwidth", f"{_g(p.memory_bandwidth_gbs)} GB/s (CPU-achievable)"),
        ("os", p.os),
        ("runtimes", ", ".join(p.runtimes)),
        ("budgets", ""),
    ]
    for key, unit in zip(_BUDGET_KEYS, ("MB", "tok/s", "ms"), strict=True):
        value = getattr(budgets, key)
        lines.append((f"  {key}", "none" if value is None else f"{_g(value)} {unit}"))
    if p.notes:
        lines.append(("notes", p.notes))
    width = max(len(k) for k, _ in lines)
    return "\n".join(
        [f"{p.name}: {p.title}"] + [f"  {k.ljust(width)}  {v}".rstrip() for k, v in lines]
    )
